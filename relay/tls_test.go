package relay

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// testPKI is a private CA with a server certificate for 127.0.0.1 and a
// client certificate, all PEM.
type testPKI struct {
	caPEM, serverCert, serverKey, clientCert, clientKey []byte
	pool                                                *x509.CertPool
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	key := func() (*ecdsa.PrivateKey, []byte) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return k, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	}
	caKey, _ := key()
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "legacy test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, server bool) ([]byte, []byte) {
		k, kp := key()
		c := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "relay test"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature,
		}
		if server {
			c.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
			c.DNSNames = []string{"legacy.internal"}
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		} else {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}
		der, err := x509.CreateCertificate(rand.Reader, c, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), kp
	}
	p := &testPKI{caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), pool: x509.NewCertPool()}
	p.pool.AddCert(caCert)
	p.serverCert, p.serverKey = issue(2, true)
	p.clientCert, p.clientKey = issue(3, false)
	return p
}

// mtlsTarget is an https server that wants a client certificate from pki.
func (p *testPKI) mtlsTarget(t *testing.T) *testTarget {
	t.Helper()
	pair, err := tls.X509KeyPair(p.serverCert, p.serverKey)
	if err != nil {
		t.Fatal(err)
	}
	tt := &testTarget{}
	tt.Server = httptest.NewUnstartedServer(http.HandlerFunc(tt.serve))
	tt.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: p.pool}
	// The handshakes this test makes fail on purpose.
	tt.Config.ErrorLog = log.New(io.Discard, "", 0)
	tt.StartTLS()
	t.Cleanup(tt.Close)
	return tt
}

// TestTLSTarget: a target behind its own CA that wants a client
// certificate. Without the CA the handshake fails and is retried, with
// the TLS error as last_error; a reload that adds the CA and the client
// certificate delivers it.
func TestTLSTarget(t *testing.T) {
	pki := newTestPKI(t)
	target := pki.mtlsTarget(t)
	tc := fastTarget("legacy", target.URL)
	tc.BackoffMin, tc.BackoffMax = 20*time.Millisecond, 20*time.Millisecond
	tc.TLS = &TLSConfig{ServerName: "legacy.internal"}
	cfg := Config{Targets: []TargetConfig{tc}}
	st, err := store.OpenBolt(tempBolt(t), store.BoltOptions{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	e := openEngine(t, cfg, Options{OpenStore: func() (store.Store, error) { return st, nil }})
	id := mustAccept(t, e, v3Body("tls-1"))
	var last store.Delivery
	waitFor(t, "a failed handshake", 5*time.Second, func() bool {
		var found bool
		_ = st.Pending(func(d *store.Delivery) error {
			last, found = *d, true
			return nil
		})
		return found && last.Attempts >= 2
	})
	if last.ID != id || !strings.Contains(last.LastError, "certificate") {
		t.Errorf("last_error %q, want the TLS error", last.LastError)
	}

	// Trusting the CA is not enough: the target wants a client
	// certificate, and refuses the handshake without one.
	tc.TLS = &TLSConfig{CA: pki.caPEM, ServerName: "legacy.internal"}
	cfg.Targets = []TargetConfig{tc}
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	before := last.Attempts
	waitFor(t, "a handshake without a client certificate to fail", 5*time.Second, func() bool {
		var found bool
		_ = st.Pending(func(d *store.Delivery) error {
			last, found = *d, true
			return nil
		})
		return found && last.Attempts >= before+2 && !strings.Contains(last.LastError, "unknown authority")
	})
	if !strings.Contains(last.LastError, "tls") && !strings.Contains(last.LastError, "certificate") {
		t.Errorf("last_error %q, want the server's refusal of a handshake without a client certificate", last.LastError)
	}
	t.Logf("without a client certificate: %s", last.LastError)

	tc.TLS = &TLSConfig{CA: pki.caPEM, Cert: pki.clientCert, Key: pki.clientKey, ServerName: "legacy.internal"}
	cfg.Targets = []TargetConfig{tc}
	if err := e.Update(cfg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the delivery over mutual TLS", 5*time.Second, func() bool { return e.PendingEvents() == 0 })
	if target.count() != 1 {
		t.Errorf("target got %d requests, want 1 (the handshakes that failed sent nothing)", target.count())
	}
}

// TestTLSConfigErrors: files that hold no certificate fail the load.
func TestTLSConfigErrors(t *testing.T) {
	for _, c := range []struct {
		tls  *TLSConfig
		url  string
		want string
	}{
		{&TLSConfig{CA: []byte("not pem"), CAFile: "/etc/ca.pem"}, "https://127.0.0.1/", "/etc/ca.pem"},
		{&TLSConfig{Cert: []byte("x")}, "https://127.0.0.1/", "both a certificate and a key"},
		{&TLSConfig{Cert: []byte("x"), Key: []byte("y"), CertFile: "c.pem", KeyFile: "k.pem"}, "https://127.0.0.1/", "c.pem"},
		{&TLSConfig{}, "http://127.0.0.1/", "https"},
	} {
		tc := fastTarget("t", c.url)
		tc.TLS = c.tls
		_, err := Config{Targets: []TargetConfig{tc}}.WithDefaults()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one naming %q", c.tls, err, c.want)
		}
	}
}
