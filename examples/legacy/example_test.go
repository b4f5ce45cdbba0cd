// Package legacyexample_test keeps the legacy example from
// rotting: its Caddyfile adapts with every shaping feature in it, each jq
// program compiles and makes what README.md says each target gets from
// event.json, and the ledger target, commented out until its TLS files
// exist, adapts once they do.
package legacyexample_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"errors"
	"io"
	"maps"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/webhook-relay/caddy-webhook-relay/caddymodule"
	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
)

// Paths as the Caddyfile and README.md write them: relative to the
// repository's root, Caddy's working directory in the README's command.
const (
	caddyfilePath = "examples/legacy/Caddyfile"
	eventPath     = "examples/legacy/event.json"
	tlsDir        = "examples/legacy/tls/"
)

// Markers of the commented-out ledger (mutual TLS) regions.
const (
	regionStart = "uncomment from here"
	regionEnd   = ": to here"
)

// TestCaddyfileAdapts: the example adapts without a warning, shows every
// shaping feature the README lists, and every program in it compiles.
func TestCaddyfileAdapts(t *testing.T) {
	t.Chdir("../..")
	h := adapt(t, readFile(t, caddyfilePath))
	if h.Auth == nil || !slices.Equal(h.Auth.Values, []string{"{env.OKHI_WEBHOOK_SECRET}"}) {
		t.Errorf("auth = %+v, want the value {env.OKHI_WEBHOOK_SECRET}", h.Auth)
	}
	targets := byName(h)
	if got, want := slices.Sorted(maps.Keys(targets)), []string{"crm", "mainframe", "soap", "status-feed"}; !slices.Equal(got, want) {
		t.Fatalf("targets %v, want %v (the ledger stays commented out)", got, want)
	}

	crm, soap, mainframe, feed := targets["crm"], targets["soap"], targets["mainframe"], targets["status-feed"]
	for _, c := range []struct {
		feature string
		shown   bool
	}{
		{"method", crm.Method == "PUT"},
		{"transform jq in backticks", crm.Transform != nil && crm.Transform.JQ != "" && !strings.Contains(crm.Transform.JQ, "\n")},
		{"body_format form", crm.BodyFormat == "form"},
		{"{event.json.*} in the URL's path and query", strings.Contains(crm.URL, "/{event.json.") && strings.Contains(crm.URL, "={event.json.")},
		{"{event.id} in a header", slices.Contains(crm.Headers.Values("X-Okhi-Event"), "{event.id}")},
		{"{event.received_at} in a header", slices.Contains(crm.Headers.Values("X-Okhi-Received-At"), "{event.received_at}")},
		{"transform jq_file", soap.Transform != nil && soap.Transform.JQFile != ""},
		{"content_type", soap.ContentType != "" && mainframe.ContentType != ""},
		{"transform jq in a heredoc", mainframe.Transform != nil && strings.Contains(mainframe.Transform.JQ, "\n")},
		{"rate", mainframe.Rate == "20/s"},
		{"documented_only", feed.DocumentedOnly},
		{"order_by", feed.OrderBy != ""},
		{"drop_stale on the order_by key", feed.DropStale != nil && feed.DropStale.KeyPath == feed.OrderBy && feed.DropStale.TimePath != ""},
		{"sign standard_webhooks with two secrets", feed.Sign != nil && feed.Sign.Scheme == "standard_webhooks" && len(feed.Sign.Secrets) == 2},
	} {
		if !c.shown {
			t.Errorf("the example no longer shows %s", c.feature)
		}
	}

	for name, tg := range targets {
		if tg.Transform == nil {
			continue
		}
		if err := shape.CheckTransform(program(t, tg)); err != nil {
			t.Errorf("target %s: %v", name, err)
		}
	}
	for _, s := range feed.Sign.Secrets {
		if _, err := shape.DecodeSecret(s); err != nil {
			t.Errorf("status-feed: %v", err)
		}
	}
}

// TestWhatEachTargetGets builds each target's request for event.json, as
// the relay does at each attempt, and checks what the example's README
// says each one shows.
func TestWhatEachTargetGets(t *testing.T) {
	t.Chdir("../..")
	h := adapt(t, readFile(t, caddyfilePath))
	targets := byName(h)
	body := readFile(t, eventPath)
	in := shape.Input{
		ID:          "1d7d9fa5f1bdb9106f62b2cbc31d6a10",
		ReceivedAt:  time.Date(2024, 5, 14, 9, 12, 4, 0, time.UTC),
		ContentType: "application/json",
		Body:        body,
	}
	now := time.Unix(1715677925, 0)
	build := func(name string, in shape.Input) (shape.Request, error) {
		t.Helper()
		p, err := shape.Compile(spec(t, targets[name]))
		if err != nil {
			t.Fatalf("target %s: %v", name, err)
		}
		return p.Build(context.Background(), in, now)
	}
	mustBuild := func(name string, in shape.Input) shape.Request {
		t.Helper()
		r, err := build(name, in)
		if err != nil {
			t.Fatalf("target %s: %v", name, err)
		}
		return r
	}

	t.Run("crm", func(t *testing.T) {
		r := mustBuild("crm", in)
		if r.Method != "PUT" || r.URL != "http://127.0.0.1:9101/addresses/C0DTxgjRdn?verification=ONYgUOybCU" {
			t.Errorf("request line %s %s", r.Method, r.URL)
		}
		if ct := r.Header.Get("Content-Type"); ct != shape.ContentTypeForm {
			t.Errorf("Content-Type %q", ct)
		}
		const form = "address=12+Ojijo+Rd%2C+Nairobi&customer_id=hbZ69KMuYB&status=verified&verified_at=1715677923"
		if string(r.Body) != form {
			t.Errorf("body %s, want %s", r.Body, form)
		}
		if got := r.Header.Get("X-Okhi-Event"); got != in.ID {
			t.Errorf("X-Okhi-Event %q, want %q", got, in.ID)
		}
		if got := r.Header.Get("X-Okhi-Received-At"); got != "2024-05-14T09:12:04Z" {
			t.Errorf("X-Okhi-Received-At %q", got)
		}
		// A location id that tries to climb the path stays one segment.
		evil := in
		evil.Body = bytes.Replace(body, []byte(`"id": "C0DTxgjRdn"`), []byte(`"id": "../admin?x=1"`), 1)
		if r := mustBuild("crm", evil); !strings.HasPrefix(r.URL, "http://127.0.0.1:9101/addresses/..%2Fadmin%3Fx=1?") {
			t.Errorf("url %s: the payload's value was not path-escaped", r.URL)
		}
	})

	t.Run("soap", func(t *testing.T) {
		// Characters XML must escape, in a value: still one well-formed
		// envelope.
		in := in
		in.Body = bytes.Replace(body, []byte("12 Ojijo Rd"), []byte(`12 <b>Ojijo</b> & \"Sons\" Rd`), 1)
		r := mustBuild("soap", in)
		if ct := r.Header.Get("Content-Type"); ct != "text/xml; charset=utf-8" {
			t.Errorf("Content-Type %q", ct)
		}
		if got := r.Header.Get("SOAPAction"); got != `"urn:example:address-verification#AddressVerified"` {
			t.Errorf("SOAPAction %q", got)
		}
		var env struct {
			Body struct {
				Verified struct {
					VerificationID string `xml:"VerificationId"`
					Status         string
					Address        string
				} `xml:"AddressVerified"`
			}
		}
		if err := xml.Unmarshal(r.Body, &env); err != nil {
			t.Fatalf("body is not XML: %v\n%s", err, r.Body)
		}
		if err := wellFormed(r.Body); err != nil {
			t.Errorf("body is not well-formed: %v\n%s", err, r.Body)
		}
		v := env.Body.Verified
		if v.VerificationID != "ONYgUOybCU" || v.Status != "verified" || v.Address != `12 <b>Ojijo</b> & "Sons" Rd, Nairobi` {
			t.Errorf("envelope holds %+v\n%s", v, r.Body)
		}
	})

	t.Run("mainframe", func(t *testing.T) {
		r := mustBuild("mainframe", in)
		const want = "ONYgUOybCU          C0DTxgjRdn          VERIFIED        20240514091203"
		if string(r.Body) != want {
			t.Errorf("record\n%q, want\n%q", r.Body, want)
		}
		if ct := r.Header.Get("Content-Type"); ct != "text/plain; charset=us-ascii" {
			t.Errorf("Content-Type %q", ct)
		}
		// The README's dead-letter demo: no event_timestamp, no record.
		in := in
		in.Body = bytes.Replace(body, []byte(`"event_timestamp": 1715677923,`), nil, 1)
		if _, err := build("mainframe", in); err == nil || !strings.Contains(err.Error(), "strftime") {
			t.Errorf("without event_timestamp: error %v, want jq's strftime error", err)
		}
	})

	t.Run("status-feed", func(t *testing.T) {
		r := mustBuild("status-feed", in)
		if ct := r.Header.Get("Content-Type"); ct != shape.ContentTypeJSON {
			t.Errorf("Content-Type %q", ct)
		}
		var got map[string]any
		if err := json.Unmarshal(r.Body, &got); err != nil {
			t.Fatalf("body %s: %v", r.Body, err)
		}
		if _, ok := got["debug_trace"]; ok {
			t.Errorf("documented_only kept an undocumented field: %s", r.Body)
		}
		if data, _ := got["data"].(map[string]any); data == nil || data["risk_score"] != nil || data["address_verification"] == nil {
			t.Errorf("documented_only made %s", r.Body)
		}
		if r.Header.Get("Webhook-Id") != in.ID || r.Header.Get("Webhook-Timestamp") != "1715677925" {
			t.Errorf("webhook-id %q, webhook-timestamp %q", r.Header.Get("Webhook-Id"), r.Header.Get("Webhook-Timestamp"))
		}
		sigs := strings.Fields(r.Header.Get("Webhook-Signature"))
		secrets := targets["status-feed"].Sign.Secrets
		if len(sigs) != len(secrets) {
			t.Fatalf("signatures %q, want one per secret (%d)", sigs, len(secrets))
		}
		for i, s := range secrets {
			key, err := shape.DecodeSecret(s)
			if err != nil {
				t.Fatal(err)
			}
			mac := hmac.New(sha256.New, key)
			mac.Write([]byte(in.ID + ".1715677925."))
			mac.Write(r.Body)
			if want := "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil)); sigs[i] != want {
				t.Errorf("signature %d = %s, want %s (over the body as sent)", i, sigs[i], want)
			}
		}
	})
}

// TestLedgerAdaptsOnceItsFilesExist uncomments the ledger's regions, as
// README.md tells a user to, with certificates made here in a temporary
// directory, and checks that the result adapts and that the relay takes
// the files.
func TestLedgerAdaptsOnceItsFilesExist(t *testing.T) {
	t.Chdir("../..")
	src := readFile(t, caddyfilePath)
	if _, err := os.Stat(filepath.Join(tlsDir, "ca.pem")); err == nil {
		t.Logf("%s exists; the test uses certificates of its own", tlsDir)
	}
	uncommented, regions := uncomment(t, string(src))
	if regions != 3 {
		t.Fatalf("found %d ledger regions, want 3 (global options, target, stand-in)", regions)
	}
	dir := t.TempDir()
	writeCerts(t, dir)
	cfg := strings.ReplaceAll(uncommented, tlsDir, dir+string(filepath.Separator))

	h := adapt(t, []byte(cfg))
	ledger, ok := byName(h)["ledger"]
	if !ok {
		t.Fatal("no ledger target once uncommented")
	}
	tl := ledger.TLS
	if tl == nil || tl.ServerName != "ledger.internal" || tl.CA != filepath.Join(dir, "ca.pem") ||
		tl.ClientCert != filepath.Join(dir, "relay.pem") || tl.ClientKey != filepath.Join(dir, "relay.key") {
		t.Fatalf("ledger tls = %+v", tl)
	}
	if !strings.HasPrefix(ledger.URL, "https://") {
		t.Errorf("ledger url %s is not https", ledger.URL)
	}
	// The relay's own check of the files: the CA parses, and the client
	// certificate and key are a pair.
	tc := relay.TargetConfig{
		Name: "ledger", URL: ledger.URL,
		TLS: &relay.TLSConfig{
			CA: readFile(t, tl.CA), CAFile: tl.CA,
			Cert: readFile(t, tl.ClientCert), CertFile: tl.ClientCert,
			Key: readFile(t, tl.ClientKey), KeyFile: tl.ClientKey,
			ServerName: tl.ServerName,
		},
	}
	if _, err := (relay.Config{Targets: []relay.TargetConfig{tc}}).WithDefaults(); err != nil {
		t.Errorf("the relay refuses the ledger's files: %v", err)
	}
	if !strings.Contains(cfg, "strict_sni_host insecure_off") || !strings.Contains(cfg, "client_auth") {
		t.Errorf("the stand-in no longer asks for a client certificate behind another Host:\n%s", cfg)
	}
}

// adapt runs Caddy's caddyfile adapter over src and returns its only
// webhook_relay handler.
func adapt(t *testing.T, src []byte) caddymodule.Handler {
	t.Helper()
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(src, map[string]any{"filename": caddyfilePath})
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	for _, w := range warnings {
		t.Errorf("warning: %s:%d: %s", w.File, w.Line, w.Message)
	}
	var doc any
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	var found []caddymodule.Handler
	walk(doc, func(obj map[string]any) {
		if obj["handler"] != "webhook_relay" {
			return
		}
		raw, err := json.Marshal(obj)
		if err != nil {
			t.Fatal(err)
		}
		var h caddymodule.Handler
		if err := json.Unmarshal(raw, &h); err != nil {
			t.Fatalf("webhook_relay handler %s: %v", raw, err)
		}
		found = append(found, h)
	})
	if len(found) != 1 {
		t.Fatalf("found %d webhook_relay handlers, want 1, in %s", len(found), out)
	}
	return found[0]
}

// walk calls f on every JSON object in v.
func walk(v any, f func(map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		f(v)
		for _, x := range v {
			walk(x, f)
		}
	case []any:
		for _, x := range v {
			walk(x, f)
		}
	}
}

func byName(h caddymodule.Handler) map[string]caddymodule.Target {
	m := make(map[string]caddymodule.Target, len(h.Targets))
	for _, tg := range h.Targets {
		m[tg.Name] = tg
	}
	return m
}

// program is a target's jq program, read from its file for jq_file.
func program(t *testing.T, tg caddymodule.Target) string {
	t.Helper()
	if tg.Transform.JQFile != "" {
		return string(readFile(t, tg.Transform.JQFile))
	}
	return tg.Transform.JQ
}

// spec is what the relay compiles for a target: the adapted settings with
// no placeholder of Caddy's own left to resolve (the example has none in
// its targets).
func spec(t *testing.T, tg caddymodule.Target) shape.Spec {
	t.Helper()
	s := shape.Spec{
		Okhi:           true,
		Method:         tg.Method,
		URL:            tg.URL,
		Headers:        tg.Headers,
		DocumentedOnly: tg.DocumentedOnly,
		ContentType:    tg.ContentType,
		Form:           tg.BodyFormat == "form",
	}
	if tg.Transform != nil {
		s.Transform = program(t, tg)
	}
	if tg.Sign != nil {
		s.Secrets = tg.Sign.Secrets
	}
	return s
}

// uncomment drops one "#" (and the space after it) from every line of
// each ledger region, as a user would, and counts the regions.
func uncomment(t *testing.T, src string) (string, int) {
	t.Helper()
	lines := strings.Split(src, "\n")
	in, regions := false, 0
	for i, l := range lines {
		switch {
		case strings.Contains(l, regionStart):
			if in {
				t.Fatalf("line %d: a region opens inside another", i+1)
			}
			in, regions = true, regions+1
		case strings.Contains(l, regionEnd):
			if !in {
				t.Fatalf("line %d: a region closes that was not open", i+1)
			}
			in = false
		case in:
			indent := l[:len(l)-len(strings.TrimLeft(l, " \t"))]
			rest, ok := strings.CutPrefix(l[len(indent):], "#")
			if !ok {
				t.Fatalf("line %d of a ledger region is not commented out: %q", i+1, l)
			}
			lines[i] = indent + strings.TrimPrefix(rest, " ")
		}
	}
	if in {
		t.Fatal("a ledger region is not closed")
	}
	return strings.Join(lines, "\n"), regions
}

// writeCerts makes what README.md's openssl lines make: a CA, the
// ledger's certificate for ledger.internal and the relay's client
// certificate, each with its key.
func writeCerts(t *testing.T, dir string) {
	t.Helper()
	caKey := newKey(t)
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "ledger-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER)
	for i, c := range []struct {
		name  string
		cn    string
		usage x509.ExtKeyUsage
	}{
		{"ledger", "ledger.internal", x509.ExtKeyUsageServerAuth},
		{"relay", "webhook-relay", x509.ExtKeyUsageClientAuth},
	} {
		key := newKey(t)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)),
			Subject:      pkix.Name{CommonName: c.cn},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{c.usage},
		}
		if c.usage == x509.ExtKeyUsageServerAuth {
			tmpl.DNSNames = []string{c.cn}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(dir, c.name+".pem"), "CERTIFICATE", der)
		writePEM(t, filepath.Join(dir, c.name+".key"), "PRIVATE KEY", keyDER)
	}
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// wellFormed reads every token of an XML document.
func wellFormed(b []byte) error {
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		if _, err := d.Token(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
