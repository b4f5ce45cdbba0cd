package caddymodule

import (
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
)

// Shaping is what a target receives and when: the settings for legacy
// services. Its fields are inlined in a target's JSON.
type Shaping struct {
	// Method of forwarded requests: POST, PUT or PATCH. Default: POST.
	Method string `json:"method,omitempty"`
	// DocumentedOnly forwards only the fields OkHi documents (source
	// okhi), applied before Transform.
	DocumentedOnly bool `json:"documented_only,omitempty"`
	// Transform makes the body from a jq program's single output.
	Transform *Transform `json:"transform,omitempty"`
	// ContentType is sent with a transform whose output is a string, as
	// those raw bytes (XML, SOAP).
	ContentType string `json:"content_type,omitempty"`
	// BodyFormat: json, or form (the top-level object as
	// application/x-www-form-urlencoded). Default: json.
	BodyFormat string `json:"body_format,omitempty"`
	// OrderBy is a gjson path: events with the same value there are
	// delivered one at a time, in the order they were accepted.
	OrderBy string `json:"order_by,omitempty"`
	// DropStale skips an event older than one already delivered for the
	// same key.
	DropStale *DropStale `json:"drop_stale,omitempty"`
	// Rate caps the requests to the target relay-wide, as <n>/<s|m|h>,
	// e.g. "20/s". Default: no cap.
	Rate string `json:"rate,omitempty"`
	// Sign signs every request.
	Sign *Sign `json:"sign,omitempty"`
	// TLS is how an https target is trusted and how the relay proves who
	// it is. Default: the system's roots, no client certificate.
	TLS *TargetTLS `json:"tls,omitempty"`
}

// Transform is a jq program, inline or in a file read at load.
type Transform struct {
	JQ     string `json:"jq,omitempty"`
	JQFile string `json:"jq_file,omitempty"`
}

// DropStale names where an event's key and time are.
type DropStale struct {
	// KeyPath is a gjson path to the key (an address, a user).
	KeyPath string `json:"key_path"`
	// TimePath is a gjson path to the event's time: unix seconds or RFC
	// 3339.
	TimePath string `json:"time_path"`
}

// Sign is a signature scheme and its secrets.
type Sign struct {
	// Scheme: standard_webhooks.
	Scheme string `json:"scheme"`
	// Secrets are whsec_<base64>; placeholders ({env.X}, {file./path})
	// allowed. One signature per secret, for rotation.
	Secrets []string `json:"secrets"`
}

// TargetTLS names the files of a target's TLS, read when the config loads
// (a renewed certificate is picked up by a reload).
type TargetTLS struct {
	// CA is a PEM file of the certificates to trust instead of the
	// system's.
	CA string `json:"ca,omitempty"`
	// ClientCert and ClientKey are PEM files for mutual TLS.
	ClientCert string `json:"client_cert,omitempty"`
	ClientKey  string `json:"client_key,omitempty"`
	// ServerName is the name to verify the target's certificate against.
	ServerName string `json:"server_name,omitempty"`
}

// apply puts s into the engine's target settings, reading the files it
// names and resolving the placeholders of its secrets.
func (s *Shaping) apply(tc *relay.TargetConfig) error {
	tc.Method = s.Method
	tc.DocumentedOnly = s.DocumentedOnly
	tc.ContentType = s.ContentType
	tc.BodyFormat = relay.BodyFormat(s.BodyFormat)
	tc.OrderBy = s.OrderBy
	if t := s.Transform; t != nil {
		switch {
		case t.JQ != "" && t.JQFile != "":
			return fmt.Errorf("transform: jq and jq_file cannot both be set")
		case t.JQFile != "":
			b, err := os.ReadFile(t.JQFile)
			if err != nil {
				return fmt.Errorf("transform jq_file: %w", err)
			}
			tc.Transform, tc.TransformName = string(b), t.JQFile
		default:
			tc.Transform = t.JQ
		}
		if strings.TrimSpace(tc.Transform) == "" {
			return fmt.Errorf("transform: the jq program is empty")
		}
	}
	if d := s.DropStale; d != nil {
		tc.DropStale = &relay.DropStale{KeyPath: d.KeyPath, TimePath: d.TimePath}
	}
	if s.Rate != "" {
		r, err := parseRate(s.Rate)
		if err != nil {
			return err
		}
		tc.Rate = r
	}
	if sg := s.Sign; sg != nil {
		if sg.Scheme != "standard_webhooks" {
			return fmt.Errorf("sign: unknown scheme %q (want standard_webhooks)", sg.Scheme)
		}
		if len(sg.Secrets) == 0 {
			return fmt.Errorf("sign standard_webhooks needs at least one secret")
		}
		secrets, err := resolveAll(sg.Secrets)
		if err != nil {
			return fmt.Errorf("sign standard_webhooks: %w", err)
		}
		tc.Sign = secrets
	}
	if t := s.TLS; t != nil {
		c := &relay.TLSConfig{ServerName: t.ServerName, CAFile: t.CA, CertFile: t.ClientCert, KeyFile: t.ClientKey}
		var err error
		if t.CA != "" {
			if c.CA, err = os.ReadFile(t.CA); err != nil {
				return fmt.Errorf("tls ca: %w", err)
			}
		}
		if (t.ClientCert == "") != (t.ClientKey == "") {
			return fmt.Errorf("tls client_cert needs a certificate file and a key file")
		}
		if t.ClientCert != "" {
			if c.Cert, err = os.ReadFile(t.ClientCert); err != nil {
				return fmt.Errorf("tls client_cert: %w", err)
			}
			if c.Key, err = os.ReadFile(t.ClientKey); err != nil {
				return fmt.Errorf("tls client_cert key: %w", err)
			}
		}
		tc.TLS = c
	}
	return nil
}

// parseRate reads <n>/<s|m|h>.
func parseRate(v string) (relay.Rate, error) {
	n, unit, ok := strings.Cut(v, "/")
	count, err := strconv.Atoi(n)
	if !ok || err != nil || count <= 0 {
		return relay.Rate{}, fmt.Errorf("rate %q: want <n>/<unit>, n a positive whole number and unit s, m or h (e.g. 20/s)", v)
	}
	per := map[string]time.Duration{"s": time.Second, "m": time.Minute, "h": time.Hour}[unit]
	if per == 0 {
		return relay.Rate{}, fmt.Errorf("rate %q: the unit must be s, m or h", v)
	}
	return relay.Rate{N: count, Per: per}, nil
}

// unmarshalShaping parses one of the forward block's shaping lines into
// s; known is false for a subdirective that is not one of them.
func unmarshalShaping(d *caddyfile.Dispenser, s *Shaping, url string) (known bool, err error) {
	switch d.Val() {
	case "method":
		v, err := oneArg(d)
		if err != nil {
			return true, err
		}
		v = strings.ToUpper(v)
		if v != http.MethodPost && v != http.MethodPut && v != http.MethodPatch {
			return true, d.Errf("method %q: want POST, PUT or PATCH", d.Val())
		}
		s.Method = v
	case "transform":
		args := d.RemainingArgs()
		if len(args) != 2 || (args[0] != "jq" && args[0] != "jq_file") {
			return true, d.Errf("transform needs jq and a program in backticks or a heredoc, or jq_file and a file: transform jq `<program>` | transform jq_file <path>")
		}
		if s.Transform != nil {
			return true, d.Errf("transform is set twice")
		}
		program := args[1]
		if args[0] == "jq_file" {
			b, err := os.ReadFile(args[1])
			if err != nil {
				return true, d.Errf("transform jq_file: %v", err)
			}
			program = string(b)
			s.Transform = &Transform{JQFile: args[1]}
		} else {
			s.Transform = &Transform{JQ: program}
		}
		if err := shape.CheckTransform(program); err != nil {
			return true, d.Errf("transform: %v", err)
		}
	case "content_type":
		v, err := oneArg(d)
		if err != nil {
			return true, err
		}
		s.ContentType = v
	case "body_format":
		v, err := oneArg(d)
		if err != nil {
			return true, err
		}
		if v != "json" && v != "form" {
			return true, d.Errf("body_format %q: want json or form", v)
		}
		s.BodyFormat = v
	case "documented_only":
		if d.NextArg() {
			return true, d.ArgErr()
		}
		s.DocumentedOnly = true
	case "order_by":
		v, err := oneArg(d)
		if err != nil {
			return true, err
		}
		s.OrderBy = v
	case "drop_stale":
		args := d.RemainingArgs()
		if len(args) != 2 {
			return true, d.Errf("drop_stale needs a key path and a time path: drop_stale <key_path> <time_path>")
		}
		s.DropStale = &DropStale{KeyPath: args[0], TimePath: args[1]}
	case "rate":
		v, err := oneArg(d)
		if err != nil {
			return true, err
		}
		if _, err := parseRate(v); err != nil {
			return true, d.Err(err.Error())
		}
		s.Rate = v
	case "sign":
		args := d.RemainingArgs()
		if len(args) < 2 || args[0] != "standard_webhooks" {
			return true, d.Errf("sign needs standard_webhooks and at least one secret: sign standard_webhooks <whsec_...> [<whsec_...>...]")
		}
		for _, sec := range args[1:] {
			if strings.Contains(sec, "{") {
				continue // a placeholder, resolved at load
			}
			if _, err := shape.DecodeSecret(sec); err != nil {
				return true, d.Err(err.Error())
			}
		}
		s.Sign = &Sign{Scheme: args[0], Secrets: args[1:]}
	case "tls":
		if d.NextArg() {
			return true, d.ArgErr()
		}
		if !strings.HasPrefix(strings.ToLower(url), "https://") {
			return true, d.Errf("tls is for https targets, and %s is not one", url)
		}
		t := &TargetTLS{}
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			switch d.Val() {
			case "ca":
				v, err := oneArg(d)
				if err != nil {
					return true, err
				}
				t.CA = v
			case "client_cert":
				args := d.RemainingArgs()
				if len(args) != 2 {
					return true, d.Errf("client_cert needs a certificate file and a key file: client_cert <cert_file> <key_file>")
				}
				t.ClientCert, t.ClientKey = args[0], args[1]
			case "server_name":
				v, err := oneArg(d)
				if err != nil {
					return true, err
				}
				t.ServerName = v
			default:
				return true, d.Errf("unrecognized tls subdirective %q (want ca, client_cert or server_name)", d.Val())
			}
		}
		for _, f := range []string{t.CA, t.ClientCert, t.ClientKey} {
			if f == "" {
				continue
			}
			if _, err := os.Stat(f); err != nil {
				return true, d.Errf("tls: %v", err)
			}
		}
		s.TLS = t
	default:
		return false, nil
	}
	return true, nil
}
