package relay

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"net/textproto"

	"golang.org/x/net/http/httpguts"
)

// Authenticator checks the custom header that the sender is set to send.
// Several accepted values allow a secret to be rotated without downtime.
type Authenticator struct {
	header  string // canonical form
	digests [][sha256.Size]byte
}

// NewAuthenticator accepts requests whose header field carries exactly one
// of values.
func NewAuthenticator(field string, values []string) (*Authenticator, error) {
	if field == "" {
		return nil, errors.New("auth header field is empty")
	}
	if !httpguts.ValidHeaderFieldName(field) {
		return nil, fmt.Errorf("auth header field %q is not a valid HTTP header name", field)
	}
	if len(values) == 0 {
		return nil, errors.New("auth header needs at least one value")
	}
	a := &Authenticator{header: textproto.CanonicalMIMEHeaderKey(field)}
	for _, v := range values {
		if v == "" {
			return nil, errors.New("auth header value is empty")
		}
		a.digests = append(a.digests, sha256.Sum256([]byte(v)))
	}
	return a, nil
}

// Header returns the canonical header field name.
func (a *Authenticator) Header() string { return a.header }

// Check reports whether h carries an accepted value, once. Values are
// compared as SHA-256 digests in constant time, so neither the position of
// the first differing byte nor the length of the secret shows in the
// timing; every accepted value is compared, whichever matches.
func (a *Authenticator) Check(h http.Header) bool {
	vals := h[a.header]
	var got []byte
	if len(vals) == 1 {
		got = []byte(vals[0])
	}
	d := sha256.Sum256(got)
	ok := 0
	for i := range a.digests {
		ok |= subtle.ConstantTimeCompare(d[:], a.digests[i][:])
	}
	return ok == 1 && len(vals) == 1
}
