package relay

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
)

// clientTLS builds the TLS settings of a target's client from the PEM
// contents its config holds; nil settings are the system's roots. It
// never skips verification.
func clientTLS(c *TLSConfig) (*tls.Config, error) {
	if c == nil {
		return nil, nil
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName}
	if len(c.CA) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(c.CA) {
			return nil, fmt.Errorf("tls ca %s: no PEM certificate in it", nameOr(c.CAFile, "(inline)"))
		}
		conf.RootCAs = pool
	}
	if len(c.Cert) > 0 || len(c.Key) > 0 {
		if len(c.Cert) == 0 || len(c.Key) == 0 {
			return nil, errors.New("tls client_cert needs both a certificate and a key")
		}
		pair, err := tls.X509KeyPair(c.Cert, c.Key)
		if err != nil {
			return nil, fmt.Errorf("tls client_cert %s %s: %v", nameOr(c.CertFile, "(inline)"), nameOr(c.KeyFile, "(inline)"), err)
		}
		conf.Certificates = []tls.Certificate{pair}
	}
	return conf, nil
}

func nameOr(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}
