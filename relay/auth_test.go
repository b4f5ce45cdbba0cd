package relay

import (
	"net/http"
	"strings"
	"testing"
)

func TestNewAuthenticatorRejectsBadConfig(t *testing.T) {
	tests := []struct {
		name   string
		field  string
		values []string
		want   string
	}{
		{"empty field", "", []string{"s3cret"}, "field is empty"},
		{"no values", "X-Auth", nil, "at least one value"},
		{"empty value", "X-Auth", []string{"s3cret", ""}, "value is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := NewAuthenticator(tt.field, tt.values)
			if err == nil {
				t.Fatalf("NewAuthenticator(%q, %q) = %v, want an error", tt.field, tt.values, a)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not say %q", err, tt.want)
			}
			for _, v := range tt.values {
				if v != "" && strings.Contains(err.Error(), v) {
					t.Errorf("error %q shows a secret", err)
				}
			}
		})
	}
}

func TestAuthenticatorCheck(t *testing.T) {
	a, err := NewAuthenticator("okhi-authorization", []string{"old-token", "new-token"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := a.Header(), "Okhi-Authorization"; got != want {
		t.Errorf("Header() = %q, want the canonical %q", got, want)
	}
	tests := []struct {
		name   string
		header http.Header
		want   bool
	}{
		{"current value", http.Header{"Okhi-Authorization": {"new-token"}}, true},
		{"previous value during rotation", http.Header{"Okhi-Authorization": {"old-token"}}, true},
		{"wrong value", http.Header{"Okhi-Authorization": {"new-tokex"}}, false},
		{"prefix of a value", http.Header{"Okhi-Authorization": {"new-tok"}}, false},
		{"value plus suffix", http.Header{"Okhi-Authorization": {"new-token2"}}, false},
		{"empty value", http.Header{"Okhi-Authorization": {""}}, false},
		{"missing header", http.Header{"Authorization": {"new-token"}}, false},
		{"no headers", http.Header{}, false},
		{"present twice, both right", http.Header{"Okhi-Authorization": {"new-token", "new-token"}}, false},
		{"present twice, one right", http.Header{"Okhi-Authorization": {"wrong", "new-token"}}, false},
		{"present twice, rotated pair", http.Header{"Okhi-Authorization": {"old-token", "new-token"}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := a.Check(tt.header); got != tt.want {
				t.Errorf("Check(%v) = %v, want %v", tt.header, got, tt.want)
			}
		})
	}
}

// TestAuthenticatorCheckFromWire checks the header as a real request
// carries it: any case on the wire, canonicalised by net/http.
func TestAuthenticatorCheckFromWire(t *testing.T) {
	a, err := NewAuthenticator("OKHI-AUTHORIZATION", []string{"tok"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := http.NewRequest(http.MethodPost, "http://127.0.0.1/", nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("okhi-authorization", "tok")
	if !a.Check(r.Header) {
		t.Error("Check rejected the right value sent under a lowercase field name")
	}
}

// BenchmarkAuthCheck compares how long a wrong secret takes to reject by
// where it differs from the right one: first and last byte should take the
// same time, since digests are compared in constant time. The time does
// grow with the length of the value sent (it is hashed), which the sender
// knows already; it never depends on the secret's own length.
func BenchmarkAuthCheck(b *testing.B) {
	secret := strings.Repeat("k", 63) + "z"
	a, err := NewAuthenticator("X-Auth", []string{secret})
	if err != nil {
		b.Fatal(err)
	}
	cases := []struct {
		name  string
		value string
	}{
		{"right", secret},
		{"wrong_first_byte", "Q" + secret[1:]},
		{"wrong_last_byte", secret[:len(secret)-1] + "Q"},
		{"wrong_length_short", secret[:8]},
		{"wrong_length_long", secret + secret},
	}
	for _, c := range cases {
		h := http.Header{"X-Auth": {c.value}}
		want := c.value == secret
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if a.Check(h) != want {
					b.Fatal("wrong verdict")
				}
			}
		})
	}
}
