package natsstore

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// logged opens a store whose logs the test reads.
func logged(cfg Config) (Config, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	cfg.Logger = zap.New(core)
	return cfg, logs
}

// noSecret fails the test if a log line, the store's down reason or err
// shows secret.
func noSecret(t *testing.T, logs *observer.ObservedLogs, secret string, errs ...error) {
	t.Helper()
	for _, e := range logs.All() {
		if strings.Contains(e.Message, secret) {
			t.Errorf("log %q shows the secret", e.Message)
		}
		for _, f := range e.Context {
			if strings.Contains(f.String, secret) || f.Interface != nil && strings.Contains(fmt.Sprint(f.Interface), secret) {
				t.Errorf("log %q, field %s shows the secret", e.Message, f.Key)
			}
		}
	}
	for _, err := range errs {
		if err != nil && strings.Contains(err.Error(), secret) {
			t.Errorf("error %q shows the secret", err)
		}
	}
}

// wantDown waits until s is down for a reason that says want, and checks
// that writes fail at once with ErrUnavailable.
func wantDown(t *testing.T, s *Store, want string) error {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var reason error
	for {
		var up bool
		up, reason = s.Up()
		if up {
			t.Fatal("store up with wrong credentials")
		}
		if reason != nil && strings.Contains(strings.ToLower(reason.Error()), want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("store down for %v, want a reason saying %q", reason, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	e := ev(1, time.Now())
	began := time.Now()
	_, err := s.Accept(ctxBG, e, []string{"t"}, dayKey(e))
	if !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Accept with wrong credentials: %v, want ErrUnavailable", err)
	}
	if d := time.Since(began); d > time.Second {
		t.Errorf("Accept with wrong credentials answered after %s", d)
	}
	t.Logf("down: %v", reason)
	return errors.Join(reason, err)
}

// TestCredentials: a server asking for a token or a user and password
// takes the store with the right ones; with wrong or no credentials the
// store stays down saying why, and never shows the secret.
func TestCredentials(t *testing.T) {
	const token, password = "tok-s3cret-1", "pw-s3cret-2"
	cases := []struct {
		name      string
		configure func(*server.Options)
		right     func(*Config)
		wrongs    map[string]func(*Config)
	}{
		{
			name:      "token",
			configure: func(o *server.Options) { o.Authorization = token },
			right:     func(c *Config) { c.Token = token },
			wrongs: map[string]func(*Config){
				"wrong token": func(c *Config) { c.Token = "tok-s3cret-x" },
				"none":        func(*Config) {},
			},
		},
		{
			name:      "user",
			configure: func(o *server.Options) { o.Username, o.Password = "relay", password },
			right:     func(c *Config) { c.User, c.Password = "relay", password },
			wrongs: map[string]func(*Config){
				"wrong password": func(c *Config) { c.User, c.Password = "relay", "pw-s3cret-x" },
				"wrong user":     func(c *Config) { c.User, c.Password = "other", password },
				// Credentials in the URL are secrets too.
				"in the url": func(c *Config) {
					c.URLs[0] = strings.Replace(c.URLs[0], "nats://", "nats://relay:pw-s3cret-x@", 1)
				},
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ns := startNATSWith(t, tc.configure)
			cfg, logs := logged(testConfig(ns.url(), nil))
			tc.right(&cfg)
			s := openUp(t, cfg)
			mustAccept(t, s, ev(1, time.Now()), "t")
			s.Close()
			noSecret(t, logs, "s3cret")
			for name, wrong := range tc.wrongs {
				t.Run(name, func(t *testing.T) {
					cfg, logs := logged(testConfig(ns.url(), nil))
					wrong(&cfg)
					s := openStore(t, cfg)
					defer s.Close()
					err := wantDown(t, s, "authorization")
					noSecret(t, logs, "s3cret", err)
				})
			}
		})
	}
}

// tokenAuth takes the clients that show its token, and counts the
// attempts it turned away.
type tokenAuth struct {
	token   atomic.Pointer[string]
	refused atomic.Int32
}

func (a *tokenAuth) Check(c server.ClientAuthentication) bool {
	if c.Kind() == server.CLIENT && c.GetOpts().Token == *a.token.Load() {
		return true
	}
	a.refused.Add(1)
	return false
}

// TestCredentialsFixed: a store whose credentials the server refused,
// again and again, comes up by itself once the server takes them, as it
// does once an unreachable server answers.
func TestCredentialsFixed(t *testing.T) {
	auth := &tokenAuth{}
	old := "tok-s3cret-old"
	auth.token.Store(&old)
	ns := startNATSWith(t, func(o *server.Options) { o.CustomClientAuthentication = auth })
	cfg, logs := logged(testConfig(ns.url(), nil))
	cfg.Token = "tok-s3cret-new"
	s := openStore(t, cfg)
	defer s.Close()
	wantDown(t, s, "refused the relay's credentials")
	// A client turned away twice in a row gives up unless told not to.
	deadline := time.Now().Add(15 * time.Second)
	for auth.refused.Load() < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("%d attempts refused in 15s, want the client to keep trying", auth.refused.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The operator rolls the servers on to the new token.
	auth.token.Store(&cfg.Token)
	began := time.Now()
	waitUp(t, s)
	t.Logf("up %s after the server took the token, %d attempts refused before", time.Since(began).Round(time.Millisecond), auth.refused.Load())
	mustAccept(t, s, ev(1, time.Now()), "t")
	noSecret(t, logs, "s3cret")
}

// testPKI is a CA and certificates it signed, as files.
type testPKI struct {
	dir                string
	ca                 *x509.Certificate
	caKey              *ecdsa.PrivateKey
	caFile             string
	serverCert         tls.Certificate
	clientCert, client string // the client's certificate and key files
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	p := &testPKI{dir: t.TempDir()}
	var err error
	if p.caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "webhook-relay test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.caKey.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	if p.ca, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	p.caFile = p.write(t, "ca.pem", "CERTIFICATE", der)
	certDER, key := p.issue(t, 2, "127.0.0.1", x509.ExtKeyUsageServerAuth)
	p.serverCert = tls.Certificate{Certificate: [][]byte{certDER}, PrivateKey: key}
	certDER, key = p.issue(t, 3, "relay", x509.ExtKeyUsageClientAuth)
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p.clientCert = p.write(t, "client.pem", "CERTIFICATE", certDER)
	p.client = p.write(t, "client-key.pem", "EC PRIVATE KEY", keyDER)
	return p
}

func (p *testPKI) issue(t *testing.T, serial int64, name string, usage x509.ExtKeyUsage) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	if ip := net.ParseIP(name); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return der, key
}

func (p *testPKI) write(t *testing.T, name, kind string, der []byte) string {
	t.Helper()
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestTLS: a server with a certificate of a private CA takes the store
// that trusts the CA (Config.TLSCA), and one that needs a client
// certificate takes the store that shows one; without them the store
// stays down saying why.
func TestTLS(t *testing.T) {
	p := newTestPKI(t)
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	tlsServer := func(mutual bool) func(*server.Options) {
		return func(o *server.Options) {
			o.TLS = true
			o.TLSTimeout = 2
			o.TLSConfig = &tls.Config{Certificates: []tls.Certificate{p.serverCert}, MinVersion: tls.VersionTLS12}
			if mutual {
				o.TLSVerify = true
				o.TLSConfig.ClientAuth = tls.RequireAndVerifyClientCert
				o.TLSConfig.ClientCAs = pool
			}
		}
	}
	t.Run("CA", func(t *testing.T) {
		ns := startNATSWith(t, tlsServer(false))
		url := "tls://127.0.0.1:" + strconv.Itoa(ns.port)
		cfg := testConfig(url, nil)
		cfg.TLSCA = p.caFile
		s := openUp(t, cfg)
		mustAccept(t, s, ev(1, time.Now()), "t")
		s.Close()

		untrusted := openStore(t, testConfig(url, nil))
		defer untrusted.Close()
		wantDown(t, untrusted, "certificate")
	})
	t.Run("Mutual", func(t *testing.T) {
		ns := startNATSWith(t, tlsServer(true))
		url := "tls://127.0.0.1:" + strconv.Itoa(ns.port)
		cfg := testConfig(url, nil)
		cfg.TLSCA, cfg.TLSCert, cfg.TLSKey = p.caFile, p.clientCert, p.client
		s := openUp(t, cfg)
		mustAccept(t, s, ev(1, time.Now()), "t")
		s.Close()

		cfg.TLSCert, cfg.TLSKey = "", ""
		anonymous := openStore(t, cfg)
		defer anonymous.Close()
		wantDown(t, anonymous, "certificate")
	})
}
