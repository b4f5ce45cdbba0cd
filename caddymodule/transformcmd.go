package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/tidwall/gjson"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
)

// redacted stands for a value the transform command does not print.
const redacted = "<redacted>"

type transformFlags struct {
	config, adapter string
	relay, target   string
	file            string
	contentType     string
	at              string
}

func transformCommand() *cobra.Command {
	var f transformFlags
	c := &cobra.Command{
		Use:   "transform --config <Caddyfile> [--adapter <name>] [--relay <name>] [--target <name>] [--file event.json] [--content-type <type>] [--at <RFC 3339 time>]",
		Short: "Print the request a target would get for an event, sending nothing",
		Long: `
transform prints the request that one target of a relay would get for an
event (read from --file, or stdin), as the relay's first attempt would
send it: the request line, the headers sorted by name (the relay's own
included), a blank line and the body (followed by a newline if it does
not end with one). Nothing is sent and no storage is opened.

The config is loaded as Caddy loads it (a Caddyfile, or JSON with a .json
name or --adapter), with the relay's {env.*} and {file.*} placeholders
resolved and jq_file read: the same environment as Caddy's is needed.
The value of a configured header that holds such a placeholder, of
Authorization, Proxy-Authorization and Cookie, and the webhook-signature
are printed as <redacted>; the auth_header values are never printed.

Whether the event passes the target's match lines is said on stderr. An
event the relay would refuse (not a JSON object for source okhi, over
max_body), or that the target's pipeline cannot shape (a jq error, a
value a header cannot carry: it would become a dead letter), is an error.
`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runTransform(f, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := c.Flags()
	fl.StringVar(&f.config, "config", "", "the Caddy config file (default: ./Caddyfile)")
	fl.StringVar(&f.adapter, "adapter", "", "the config adapter (default: caddyfile, or none for a .json file)")
	fl.StringVar(&f.relay, "relay", relay.DefaultName, "the relay's name")
	fl.StringVar(&f.target, "target", "", "the target's name (default: the relay's only target)")
	fl.StringVar(&f.file, "file", "", "the event's body (default: stdin)")
	fl.StringVar(&f.contentType, "content-type", "application/json", "the event's Content-Type as the sender would send it")
	fl.StringVar(&f.at, "at", "", "when the event is received and attempted, RFC 3339 (default: now)")
	return c
}

func runTransform(f transformFlags, stdin io.Reader, stdout, stderr io.Writer) error {
	now := time.Now()
	if f.at != "" {
		t, err := time.Parse(time.RFC3339, f.at)
		if err != nil {
			return fmt.Errorf("--at: %w", err)
		}
		now = t
	}
	cfgJSON, err := loadCaddyConfig(f.config, f.adapter)
	if err != nil {
		return err
	}
	h, err := findRelay(cfgJSON, f.relay)
	if err != nil {
		return err
	}
	target, err := pickTarget(h, f.target)
	if err != nil {
		return err
	}
	cfg, err := h.relayConfig()
	if err != nil {
		return fmt.Errorf("relay %s: %w", f.relay, err)
	}

	var body []byte
	if f.file != "" {
		body, err = os.ReadFile(f.file)
	} else {
		body, err = io.ReadAll(io.LimitReader(stdin, cfg.MaxBody+1))
	}
	if err != nil {
		return fmt.Errorf("reading the event: %w", err)
	}
	if int64(len(body)) > cfg.MaxBody {
		return fmt.Errorf("the relay would refuse this event with 413: its body is over max_body (%d bytes)", cfg.MaxBody)
	}
	if cfg.Source != relay.SourceGeneric && !isJSONObject(body) {
		return fmt.Errorf("the relay would refuse this event with 400: source %s takes a JSON object, and the body is not one", cfg.Source)
	}

	var tc relay.TargetConfig
	for _, t := range cfg.Targets {
		if t.Name == target.Name {
			tc = t
		}
	}
	if why := mismatch(&tc, body); why != "" {
		fmt.Fprintf(stderr, "relay %s, target %s: the event does not pass %s: the relay would not send it to this target; had it passed, the target would get:\n", cfg.Name, tc.Name, why)
	} else {
		fmt.Fprintf(stderr, "relay %s, target %s: the event passes the match lines: the relay would send it this request\n", cfg.Name, tc.Name)
	}
	if cfg.Dedupe.Off {
		fmt.Fprintln(stderr, "dedupe is off: every event gets a random id, so Idempotency-Key and webhook-id differ at every run")
	}

	req, err := relay.Preview(cfg, tc.Name, body, f.contentType, now)
	if err != nil {
		return fmt.Errorf("target %s cannot be sent this event (it would become a dead letter): %w", tc.Name, err)
	}
	return printRequest(stdout, req, secretHeaders(target))
}

// loadCaddyConfig reads a config file as `caddy run` does: a Caddyfile
// through its adapter unless --adapter says otherwise, a .json file as
// is. Caddy's own loader is not used: it logs to Caddy's default logger
// and reads the config from stdin for "-", where the event is.
func loadCaddyConfig(file, adapter string) ([]byte, error) {
	if file == "" {
		file = "Caddyfile"
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading the config: %w", err)
	}
	if adapter == "" && !strings.EqualFold(filepath.Ext(file), ".json") {
		adapter = "caddyfile"
	}
	if adapter == "" {
		return b, nil
	}
	a := caddyconfig.GetAdapter(adapter)
	if a == nil {
		return nil, fmt.Errorf("unrecognized config adapter: %s", adapter)
	}
	out, _, err := a.Adapt(b, map[string]any{"filename": file})
	if err != nil {
		return nil, fmt.Errorf("adapting %s with %s: %w", file, adapter, err)
	}
	return out, nil
}

// findRelay returns the webhook_relay handler named name anywhere in a
// JSON config (in any server's routes and subroutes).
func findRelay(cfgJSON []byte, name string) (*Handler, error) {
	var cfg any
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		return nil, fmt.Errorf("the config is not JSON: %w", err)
	}
	var found *Handler
	var names []string
	var walk func(v any) error
	walk = func(v any) error {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "webhook_relay" {
				raw, err := json.Marshal(v)
				if err != nil {
					return err
				}
				var h Handler
				if err := json.Unmarshal(raw, &h); err != nil {
					return fmt.Errorf("a webhook_relay handler: %w", err)
				}
				n := h.Name
				if n == "" {
					n = relay.DefaultName
				}
				if n == name && found == nil {
					found = &h // a site on several servers has copies of it: one relay
				}
				names = append(names, n)
				return nil
			}
			for _, e := range v {
				if err := walk(e); err != nil {
					return err
				}
			}
		case []any:
			for _, e := range v {
				if err := walk(e); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(cfg); err != nil {
		return nil, err
	}
	if found == nil {
		if len(names) == 0 {
			return nil, errors.New("the config has no webhook_relay handler")
		}
		slices.Sort(names)
		return nil, fmt.Errorf("the config has no relay named %q (--relay); it has: %s", name, strings.Join(slices.Compact(names), ", "))
	}
	return found, nil
}

// pickTarget returns the relay's target named name, or its only target
// when name is "".
func pickTarget(h *Handler, name string) (*Target, error) {
	var names []string
	for i := range h.Targets {
		if h.Targets[i].Name == name || (name == "" && len(h.Targets) == 1) {
			return &h.Targets[i], nil
		}
		names = append(names, h.Targets[i].Name)
	}
	if name == "" {
		return nil, fmt.Errorf("the relay has several targets: name one with --target (%s)", strings.Join(names, ", "))
	}
	return nil, fmt.Errorf("the relay has no target %q (--target); it has: %s", name, strings.Join(names, ", "))
}

// mismatch names the first match line of tc that body does not pass, ""
// when it passes them all.
func mismatch(tc *relay.TargetConfig, body []byte) string {
	for _, m := range tc.Match {
		one := relay.TargetConfig{Match: []relay.Match{m}}
		if one.Matches(body) {
			continue
		}
		has := "nothing"
		if v := gjson.GetBytes(body, m.Path); v.Exists() {
			has = fmt.Sprintf("%q", v.String())
		}
		return fmt.Sprintf("match %s %s (it has %s there)", m.Path, strings.Join(m.Values, " "), has)
	}
	return ""
}

// secretHeaders are the canonical names of the configured headers of t
// whose values are not to be printed: those that hold a placeholder
// resolved from the environment or a file, and those that carry
// credentials (whose literal value may have come from a {$VAR} the
// Caddyfile adapter substituted).
func secretHeaders(t *Target) map[string]bool {
	secret := map[string]bool{
		"Authorization":       true,
		"Proxy-Authorization": true,
		"Cookie":              true,
	}
	for k, vs := range t.Headers {
		for _, v := range vs {
			if holdsGlobalPlaceholder(v) {
				secret[http.CanonicalHeaderKey(k)] = true
			}
		}
	}
	// The relay's own headers are never the configured values.
	for _, k := range []string{relay.HeaderIdempotencyKey, relay.HeaderAttempt, relay.HeaderTarget} {
		delete(secret, k)
	}
	secret[shape.HeaderWebhookSignature] = true
	return secret
}

// holdsGlobalPlaceholder reports whether a configured value holds a
// placeholder other than {event.*}: one Provision resolves.
func holdsGlobalPlaceholder(v string) bool {
	found := false
	_, _ = caddy.NewEmptyReplacer().ReplaceFunc(v, func(key string, val any) (any, error) {
		found = found || !strings.HasPrefix(key, "event.")
		return val, nil
	})
	return found
}

// printRequest writes r as its target would get it, with the values of
// the secret headers replaced.
func printRequest(w io.Writer, r shape.Request, secret map[string]bool) error {
	target := r.URL
	if u, err := url.Parse(r.URL); err == nil {
		target = u.Redacted()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s\n", r.Method, target)
	for _, k := range slices.Sorted(maps.Keys(r.Header)) {
		for _, v := range r.Header[k] {
			if secret[k] {
				v = redacted
			}
			fmt.Fprintf(&b, "%s: %s\n", k, v)
		}
	}
	b.WriteByte('\n')
	b.Write(r.Body)
	if len(r.Body) > 0 && r.Body[len(r.Body)-1] != '\n' {
		b.WriteByte('\n')
	}
	_, err := io.WriteString(w, b.String())
	return err
}
