package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

const testSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// TestShapingCaddyfile: every shaping line of a forward block, into the
// target's JSON.
func TestShapingCaddyfile(t *testing.T) {
	dir := t.TempDir()
	jqFile := filepath.Join(dir, "crm.jq")
	ca := filepath.Join(dir, "ca.pem")
	for _, f := range []string{jqFile, ca} {
		if err := os.WriteFile(f, []byte(".v2"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	input := `webhook_relay {
		auth_header X-Secret s3cret
		forward crm https://127.0.0.1:9443/addresses/{event.json.v2.address_verification_id}?s={event.json.v2.verification_status} {
			method put
			transform jq ` + "`{id: .v2.address_verification_id, status: .v2.verification_status}`" + `
			body_format form
			documented_only
			order_by v2.address_verification_id
			drop_stale data.location.id event_timestamp
			rate 20/s
			sign standard_webhooks ` + testSecret + ` {env.NEW_SECRET}
			tls {
				ca ` + ca + `
				client_cert ` + ca + ` ` + ca + `
				server_name crm.internal
			}
		}
		forward soap https://127.0.0.1:9444/soap {
			transform jq_file ` + jqFile + `
			content_type application/soap+xml
		}
		forward heredoc http://127.0.0.1:9000/h {
			transform jq <<JQ
				{id: .event_id,
				 path: .path}
				JQ
		}
	}`
	var got Handler
	if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		t.Fatal(err)
	}
	want := []Shaping{
		{
			Method:         "PUT",
			Transform:      &Transform{JQ: "{id: .v2.address_verification_id, status: .v2.verification_status}"},
			BodyFormat:     "form",
			DocumentedOnly: true,
			OrderBy:        "v2.address_verification_id",
			DropStale:      &DropStale{KeyPath: "data.location.id", TimePath: "event_timestamp"},
			Rate:           "20/s",
			Sign:           &Sign{Scheme: "standard_webhooks", Secrets: []string{testSecret, "{env.NEW_SECRET}"}},
			TLS:            &TargetTLS{CA: ca, ClientCert: ca, ClientKey: ca, ServerName: "crm.internal"},
		},
		{Transform: &Transform{JQFile: jqFile}, ContentType: "application/soap+xml"},
		{Transform: &Transform{JQ: "{id: .event_id,\n path: .path}"}},
	}
	if len(got.Targets) != len(want) {
		t.Fatalf("%d targets, want %d", len(got.Targets), len(want))
	}
	for i, w := range want {
		if !reflect.DeepEqual(got.Targets[i].Shaping, w) {
			t.Errorf("target %s:\n%s\nwant\n%s", got.Targets[i].Name, toJSON(t, got.Targets[i].Shaping), toJSON(t, w))
		}
	}
}

// TestShapingCaddyfileErrors: each bad line fails with a sentence and
// its file and line.
func TestShapingCaddyfileErrors(t *testing.T) {
	block := func(lines string) string {
		return "webhook_relay {\n\tauth_header X-Secret s3cret\n\tforward t1 https://127.0.0.1:9000/hook {\n" + lines + "\n\t}\n}"
	}
	for _, c := range []struct {
		name, lines string
		want        []string
	}{
		{"method", "method GET", []string{`method "GET": want POST, PUT or PATCH`, "Testfile:4"}},
		{"jq that does not compile", "transform jq `{id: .a,`", []string{"transform:", "Testfile:4"}},
		{"jq with an undefined function", "transform jq `nosuchfunction(1)`", []string{"nosuchfunction", "Testfile:4"}},
		{"jq_file missing", "transform jq_file /nonexistent/x.jq", []string{"/nonexistent/x.jq", "Testfile:4"}},
		{"transform twice", "transform jq `.`\ntransform jq `.`", []string{"transform is set twice", "Testfile:5"}},
		{"transform without engine", "transform `.`", []string{"transform needs jq", "Testfile:4"}},
		{"body_format", "body_format xml", []string{`body_format "xml"`, "Testfile:4"}},
		{"rate unit", "rate 20/d", []string{"unit must be s, m or h", "Testfile:4"}},
		{"rate count", "rate fast", []string{"want <n>/<unit>", "Testfile:4"}},
		{"rate zero", "rate 0/s", []string{"positive", "Testfile:4"}},
		{"drop_stale one path", "drop_stale data.id", []string{"drop_stale needs a key path and a time path", "Testfile:4"}},
		{"sign scheme", "sign hmac abc", []string{"sign needs standard_webhooks", "Testfile:4"}},
		{"sign secret", "sign standard_webhooks s3cret", []string{"whsec_", "Testfile:4"}},
		{"sign secret base64", "sign standard_webhooks whsec_!!!", []string{"base64", "Testfile:4"}},
		{"tls file", "tls {\n ca /nonexistent/ca.pem\n}", []string{"/nonexistent/ca.pem", "Testfile:"}},
		{"tls subdirective", "tls {\n insecure_skip_verify\n}", []string{`unrecognized tls subdirective "insecure_skip_verify"`, "Testfile:5"}},
		{"order_by", "order_by", []string{"order_by needs one argument", "Testfile:4"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(block(c.lines)))
			if err == nil {
				t.Fatalf("no error; want %q", c.want)
			}
			assertContains(t, err.Error(), c.want...)
		})
	}
	var g Handler
	err := g.UnmarshalCaddyfile(caddyfile.NewTestDispenser("webhook_relay {\n source generic\n auth_header X-Secret s\n forward t1 http://127.0.0.1:9000/ {\n  documented_only\n }\n}"))
	if err == nil {
		t.Fatal("documented_only with source generic: no error")
	}
	assertContains(t, err.Error(), "documented_only needs source okhi", "Testfile:4")
	var h Handler
	err = h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("webhook_relay {\n auth_header X-Secret s\n forward t1 http://127.0.0.1:9000/ {\n  tls {\n  }\n }\n}"))
	if err == nil {
		t.Fatal("tls on an http URL: no error")
	}
	assertContains(t, err.Error(), "tls is for https targets", "Testfile:4")
}

// TestTransformThroughCaddyfileAdapt pins what Caddy's adapter does to a
// jq program: it rewrites {$VAR} and shorthand placeholders such as
// {path} in every token before the module sees it, so jq's object
// shorthands {path} and {$name} are not what reaches jq (the README says
// to write {path: .path}, or use a jq_file), while {path: .path} and the
// rest of the program arrive byte for byte.
func TestTransformThroughCaddyfileAdapt(t *testing.T) {
	site := func(program string) []byte {
		return []byte("http://localhost:9080 {\n\twebhook_relay {\n\t\tauth_header X-Secret a\n\t\tforward t1 http://127.0.0.1:9000/a {\n\t\t\ttransform jq `" + program + "`\n\t\t}\n\t}\n}\n")
	}
	adapted := func(program string) (string, error) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(site(program), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			return "", err
		}
		var cfg struct {
			Apps struct {
				HTTP struct {
					Servers map[string]struct {
						Routes []struct {
							Handle []struct {
								Routes []struct {
									Handle []json.RawMessage `json:"handle"`
								} `json:"routes"`
							} `json:"handle"`
						} `json:"routes"`
					} `json:"servers"`
				} `json:"http"`
			} `json:"apps"`
		}
		if err := json.Unmarshal(out, &cfg); err != nil {
			t.Fatal(err)
		}
		for _, srv := range cfg.Apps.HTTP.Servers {
			for _, r := range srv.Routes {
				for _, h := range r.Handle {
					for _, sub := range h.Routes {
						for _, raw := range sub.Handle {
							var hd Handler
							if err := json.Unmarshal(raw, &hd); err == nil && len(hd.Targets) > 0 {
								return hd.Targets[0].Transform.JQ, nil
							}
						}
					}
				}
			}
		}
		t.Fatalf("no webhook_relay handler in %s", out)
		return "", nil
	}
	const kept = `{id: .event_id, path: .path, q: "{x}"}`
	got, err := adapted(kept)
	if err != nil {
		t.Fatalf("adapt: %v", err)
	}
	if got != kept {
		t.Errorf("program arrived as %q, want %q", got, kept)
	}
	for _, shorthand := range []string{`{path}`, `.event_id as $name | {$name}`} {
		got, err = adapted(shorthand)
		if err == nil && got == shorthand {
			t.Errorf("%s reached jq unchanged: Caddy's adapter no longer rewrites it, and the README's warning is out of date", shorthand)
		}
	}
}

// TestShapingEndToEnd: a real Caddy from a Caddyfile. A jq_file transform
// to SOAP XML, a header from the event, a header whose {env.X} holds text
// that looks like an event placeholder (sent as that text, never expanded
// with the payload), and a signature whose secret comes from {file.X}.
func TestShapingEndToEnd(t *testing.T) {
	const port = 9098
	dir := t.TempDir()
	program := filepath.Join(dir, "soap.jq")
	if err := os.WriteFile(program, []byte(`"<verify id=\"" + .data.address_verification.id + "\">" + .data.address_verification.status + "</verify>"`), 0o600); err != nil {
		t.Fatal(err)
	}
	secretFile := filepath.Join(dir, "signing")
	if err := os.WriteFile(secretFile, []byte(testSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("WEBHOOK_RELAY_TEST_LITERAL", "{event.json.data.address_verification.status}")
	target := newTarget(t, http.StatusOK)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay shaped {
		auth_header X-Secret %s
		storage %s
		forward soap %s/soap/{event.json.data.address_verification.id} {
			method PATCH
			transform jq_file %s
			content_type application/soap+xml
			header X-Event {event.id}
			header X-Literal {env.WEBHOOK_RELAY_TEST_LITERAL}
			sign standard_webhooks {file.%s}
		}
	}`, secret, t.TempDir(), target.URL, program, secretFile)))
	event := okhiEvent("ADDR-1", "verified")
	id := ack(t, post(t, tester, fmt.Sprintf("http://localhost:%d/", port), event), "accepted")
	target.waitDelivered(t, 10*time.Second, id)
	r := target.requests()[0]
	if want := `<verify id="ONYgUOybCU">verified</verify>`; r.body != want {
		t.Errorf("body %q, want %q", r.body, want)
	}
	for k, want := range map[string]string{
		"Content-Type": "application/soap+xml",
		"X-Event":      id,
		"X-Literal":    "{event.json.data.address_verification.status}",
		"Webhook-Id":   id,
	} {
		if got := r.header.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if !strings.HasPrefix(r.header.Get("Webhook-Signature"), "v1,") {
		t.Errorf("no signature: %q", r.header.Get("Webhook-Signature"))
	}
}
