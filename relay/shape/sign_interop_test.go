package shape

import (
	"encoding/base64"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

// TestSignVerifiedByTheReferenceLibrary: what Build signs, the Standard
// Webhooks project's own Go library (code we did not write) verifies, for
// each secret of a rotation, and refuses once the body is changed.
func TestSignVerifiedByTheReferenceLibrary(t *testing.T) {
	next := "whsec_" + base64.StdEncoding.EncodeToString([]byte("a rotated secret of 32 bytes...."))
	p := mustCompile(t, Spec{Transform: `{id: .v2.user_id, status: "verified"}`, Secrets: []string{testSecret, next}})
	// The library checks the timestamp against its own clock.
	r, err := p.Build(t.Context(), input(okhiV2), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{testSecret, next} {
		wh, err := standardwebhooks.NewWebhook(secret)
		if err != nil {
			t.Fatal(err)
		}
		if err := wh.Verify(r.Body, r.Header); err != nil {
			t.Errorf("the reference library refuses the signature for %s...: %v", secret[:10], err)
		}
		if err := wh.Verify(append(r.Body, ' '), r.Header); err == nil {
			t.Error("the reference library accepted a changed body")
		}
	}
	wrong, err := standardwebhooks.NewWebhook("whsec_" + base64.StdEncoding.EncodeToString([]byte("not one of the secrets")))
	if err != nil {
		t.Fatal(err)
	}
	if err := wrong.Verify(r.Body, r.Header); err == nil {
		t.Error("the reference library accepted a secret that did not sign")
	}
}
