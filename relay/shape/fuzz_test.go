package shape

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http/httpguts"
)

// FuzzBuild runs Build over arbitrary bodies, content types and ids with
// pipelines covering every step. Run it with
//
//	go test -run '^$' -fuzz '^FuzzBuild$' -fuzztime 30s ./relay/shape/
//
// Properties: no panic; Build leaves the body as it was; a request it
// returns has a URL on the configured host, header names and values HTTP
// can carry, and a signature that verifies over the body as sent;
// documented_only alone makes JSON; form makes a body that parses; an
// error is a sentence.
func FuzzBuild(f *testing.F) {
	for _, seed := range []string{
		okhiV2, okhiV2InProgress, okhiV3, testBody, `{}`, `[]`, `null`, `"s"`, ``, `not json`,
		`{"v2": {"user_id": "a\r\nX-Evil: 1"}}`, `{"v2": {"user_id": "../../x?y=1#z"}}`,
		`{"v2": {"user_id": "u", "user_id": "v"}}`, `{"a": 12345678901234567890, "b": [1, {"c": null}]}`,
		`{"v2": {}}{"v2": {}}`, "{\"v2\": {\"user_id\": \"\xff\xfe\"}}",
	} {
		f.Add([]byte(seed), "application/json", "evt_01")
	}
	f.Add([]byte(okhiV2), "text/plain\r\nX: 1", "evt\n")

	const host = "127.0.0.1:9"
	secrets := []string{testSecret, "whsec_" + base64.StdEncoding.EncodeToString([]byte("k2"))}
	keys := make([][]byte, len(secrets))
	for i, s := range secrets {
		keys[i], _ = DecodeSecret(s)
	}
	placeholders := header(
		"X-User", "{event.json.v2.user_id}", "X-Id", "{event.id}", "X-At", "{event.received_at}",
		"X-Data", "u={event.json.data}", "X-Static", "s",
	)
	specs := map[string]Spec{
		"plain":            {Okhi: true},
		"documented":       {Okhi: true, DocumentedOnly: true},
		"transform":        {Transform: `{id: .v2.user_id, all: .}`},
		"transform string": {Transform: `tostring`, ContentType: "application/soap+xml"},
		"transform any":    {Transform: `.. | numbers`},
		"form":             {Form: true},
		"everything": {
			Okhi: true, DocumentedOnly: true, Transform: `.v2 // .data // {}`, Form: true, MaxBody: 1 << 10,
			URL:     "http://" + host + "/u/{event.json.v2.user_id}/{event.id}?at={event.received_at}&loc={event.json.v2.location_id}",
			Headers: placeholders, Secrets: secrets,
		},
		"placeholders": {URL: "https://" + host + "/{event.json.@this}?q={event.json.#}", Headers: placeholders, Secrets: secrets},
	}
	pipelines := map[string]*Pipeline{}
	for name, s := range specs {
		if s.URL == "" {
			s.URL = "http://" + host + "/hook"
		}
		pipelines[name] = mustCompile(f, s)
	}

	f.Fuzz(func(t *testing.T, body []byte, ctype, id string) {
		orig := bytes.Clone(body)
		in := Input{ID: id, ReceivedAt: time.Unix(1715677923, 5), ContentType: ctype, Body: body}
		for name, p := range pipelines {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			r, err := p.Build(ctx, in, testNow)
			cancel()
			if !bytes.Equal(body, orig) {
				t.Fatalf("%s: Build changed the body %q to %q", name, orig, body)
			}
			if err != nil {
				if msg := err.Error(); msg == "" || strings.ContainsAny(msg, "\r\n") && !strings.Contains(msg, "jq") {
					t.Errorf("%s: error %q is not a one-line sentence", name, msg)
				}
				continue
			}
			u, uerr := url.Parse(r.URL)
			if uerr != nil || u.Host != host {
				t.Errorf("%s: url %q (%v) is not on host %s", name, r.URL, uerr, host)
			}
			for k, vs := range r.Header {
				if !httpguts.ValidHeaderFieldName(k) {
					t.Errorf("%s: header name %q", name, k)
				}
				for _, v := range vs {
					if !httpguts.ValidHeaderFieldValue(v) {
						t.Errorf("%s: header %s value %q cannot be sent", name, k, v)
					}
				}
			}
			if sigs := r.Header.Get(HeaderWebhookSignature); sigs != "" {
				ts := r.Header.Get(HeaderWebhookTimestamp)
				for i, sig := range strings.Split(sigs, " ") {
					mac := hmac.New(sha256.New, keys[i])
					mac.Write([]byte(id + "." + ts + "."))
					mac.Write(r.Body)
					if want := "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil)); sig != want {
						t.Errorf("%s: signature %d = %q, want %q", name, i, sig, want)
					}
				}
			}
			switch name {
			case "plain":
				if !bytes.Equal(r.Body, body) {
					t.Errorf("plain: body %q, want the original %q", r.Body, body)
				}
			case "documented":
				if !json.Valid(r.Body) {
					t.Errorf("documented: body %q is not JSON", r.Body)
				}
			case "form", "everything":
				if _, err := url.ParseQuery(string(r.Body)); err != nil {
					t.Errorf("%s: form body %q does not parse: %v", name, r.Body, err)
				}
			}
		}
	})
}
