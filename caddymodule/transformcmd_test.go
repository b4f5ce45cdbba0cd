package caddymodule

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// transformSecrets are values the transform command must never print.
const (
	transformAuth  = "auth-s3cret-value"
	transformToken = "tok-s3cret-value"
)

// transformSetup writes a Caddyfile whose relay has a target with a
// jq_file transform, headers from the environment, a literal header and
// one from the event, and a signature whose secret is in a file; it
// returns the Caddyfile's path.
func transformSetup(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("TRANSFORM_TEST_AUTH", transformAuth)
	t.Setenv("TRANSFORM_TEST_TOKEN", transformToken)
	secretFile := write("sign.secret", testSecret+"\n")
	jqFile := write("crm.jq", "{id: .event_id, status: .data.address_verification.status, location: .data.location.id}\n")
	return write("Caddyfile", `:8080 {
	webhook_relay crm_relay {
		auth_header okhi-authorization {env.TRANSFORM_TEST_AUTH}
		storage memory
		forward crm http://crm.internal/hooks/{event.json.data.location.id}?event={event.id} {
			match data.address_verification.status verified
			header Authorization "Bearer {env.TRANSFORM_TEST_TOKEN}"
			header X-Source okhi
			header X-Event {event.id}
			transform jq_file `+jqFile+`
			sign standard_webhooks {file.`+secretFile+`}
		}
		forward strict http://strict.internal/hooks {
			transform jq `+"`"+`if .data.location.id == null then error("no location for the CRM") else . end`+"`"+`
		}
	}
}
`)
}

// runTransformCmd runs the command as the caddy CLI would, with stdin.
func runTransformCmd(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := transformCommand()
	var out, errOut bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetIn(strings.NewReader(stdin))
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SilenceUsage = true
	err = cmd.Execute()
	return out.String(), errOut.String(), err
}

func TestTransformCommand(t *testing.T) {
	caddyfile := transformSetup(t)
	event := okhiEvent("evt-1", "verified")
	eventFile := filepath.Join(t.TempDir(), "event.json")
	if err := os.WriteFile(eventFile, []byte(event), 0o600); err != nil {
		t.Fatal(err)
	}
	id := okhiEventID(t, event)
	want := "POST http://crm.internal/hooks/C0DTxgjRdn?event=" + id + "\n" +
		"Authorization: <redacted>\n" +
		"Content-Type: application/json\n" +
		"Idempotency-Key: " + id + "\n" +
		"User-Agent: " + relay.UserAgent + "\n" +
		"Webhook-Id: " + id + "\n" +
		"Webhook-Signature: <redacted>\n" +
		"Webhook-Timestamp: 1893553445\n" +
		"X-Event: " + id + "\n" +
		"X-Source: okhi\n" +
		"X-Webhook-Relay-Attempt: 1\n" +
		"X-Webhook-Relay-Target: crm\n" +
		"\n" +
		`{"id":"evt-1","location":"C0DTxgjRdn","status":"verified"}` + "\n"
	at := "2030-01-02T03:04:05Z"

	// The same config as JSON, as `caddy adapt` writes it.
	src, err := os.ReadFile(caddyfile)
	if err != nil {
		t.Fatal(err)
	}
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(src, map[string]any{"filename": caddyfile})
	if err != nil {
		t.Fatal(err)
	}
	jsonConfig := filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(jsonConfig, adapted, 0o600); err != nil {
		t.Fatal(err)
	}

	noSecrets := func(t *testing.T, outputs ...string) {
		t.Helper()
		for _, out := range outputs {
			for _, s := range []string{transformAuth, transformToken, testSecret, strings.TrimPrefix(testSecret, "whsec_"), "v1,"} {
				if strings.Contains(out, s) {
					t.Errorf("output holds the secret %q:\n%s", s, out)
				}
			}
		}
	}

	tests := []struct {
		name  string
		stdin string
		args  []string
	}{
		{"Caddyfile, --file", "", []string{"--config", caddyfile, "--relay", "crm_relay", "--target", "crm", "--file", eventFile, "--at", at}},
		{"Caddyfile, stdin", event, []string{"--config", caddyfile, "--relay", "crm_relay", "--target", "crm", "--at", at}},
		{"JSON", event, []string{"--config", jsonConfig, "--relay", "crm_relay", "--target", "crm", "--at", at}},
		{"Caddyfile through --adapter", event, []string{"--config", caddyfile, "--adapter", "caddyfile", "--relay", "crm_relay", "--target", "crm", "--at", at}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, err := runTransformCmd(t, tt.stdin, tt.args...)
			if err != nil {
				t.Fatalf("transform: %v\nstderr: %s", err, stderr)
			}
			if stdout != want {
				t.Errorf("stdout:\n%s\nwant:\n%s", stdout, want)
			}
			if !strings.Contains(stderr, "relay crm_relay, target crm: the event passes the match lines") {
				t.Errorf("stderr %q does not say the event matches", stderr)
			}
			noSecrets(t, stdout, stderr)
		})
	}

	t.Run("not matching", func(t *testing.T) {
		pending := okhiEvent("evt-2", "pending")
		stdout, stderr, err := runTransformCmd(t, pending, "--config", caddyfile, "--relay", "crm_relay", "--target", "crm", "--at", at)
		if err != nil {
			t.Fatalf("transform: %v", err)
		}
		if !strings.Contains(stderr, `does not pass match data.address_verification.status verified (it has "pending" there): the relay would not send it to this target`) {
			t.Errorf("stderr %q does not say which match line fails", stderr)
		}
		if !strings.HasSuffix(stdout, `{"id":"evt-2","location":"C0DTxgjRdn","status":"pending"}`+"\n") {
			t.Errorf("stdout %q: want the request it would have got", stdout)
		}
		noSecrets(t, stdout, stderr)
	})

	errs := []struct {
		name  string
		stdin string
		args  []string
		want  string
	}{
		{"jq error", `{"event_id":"evt-3","data":{}}`, []string{"--target", "strict"}, "target strict cannot be sent this event (it would become a dead letter): transform: jq: error: no location for the CRM"},
		{"not a JSON object", `[1]`, []string{"--target", "crm"}, "would refuse this event with 400"},
		{"unknown target", event, []string{"--target", "nope"}, `no target "nope" (--target); it has: crm, strict`},
		{"several targets", event, nil, "name one with --target (crm, strict)"},
		{"unknown relay", event, []string{"--relay", "other", "--target", "crm"}, `no relay named "other" (--relay); it has: crm_relay`},
		{"bad --at", event, []string{"--target", "crm", "--at", "yesterday"}, "--at"},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--config", caddyfile}, tt.args...)
			if !strings.Contains(strings.Join(tt.args, " "), "--relay") {
				args = append(args, "--relay", "crm_relay")
			}
			stdout, stderr, err := runTransformCmd(t, tt.stdin, args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want %q", err, tt.want)
			}
			if stdout != "" {
				t.Errorf("stdout %q, want nothing", stdout)
			}
			if err != nil {
				noSecrets(t, err.Error(), stderr)
			}
		})
	}

	t.Run("unresolved placeholder", func(t *testing.T) {
		t.Setenv("TRANSFORM_TEST_TOKEN", "")
		_, _, err := runTransformCmd(t, event, "--config", caddyfile, "--relay", "crm_relay", "--target", "crm")
		if err == nil || !strings.Contains(err.Error(), "{env.TRANSFORM_TEST_TOKEN}") {
			t.Errorf("error %v, want the empty placeholder named", err)
		}
	})
}

// TestHoldsGlobalPlaceholder: the headers masked are those whose values
// Provision resolves; {event.*} is the event's, not a secret.
func TestHoldsGlobalPlaceholder(t *testing.T) {
	tests := []struct {
		v    string
		want bool
	}{
		{"okhi", false},
		{"{event.id}", false},
		{"id {event.json.a.b} at {event.received_at}", false},
		{"Bearer {env.TOKEN}", true},
		{"{file./run/secrets/x}", true},
		{"{event.id}-{env.X}", true},
		{`\{env.X\}`, false},
	}
	for _, tt := range tests {
		if got := holdsGlobalPlaceholder(tt.v); got != tt.want {
			t.Errorf("holdsGlobalPlaceholder(%q) = %v, want %v", tt.v, got, tt.want)
		}
	}
}
