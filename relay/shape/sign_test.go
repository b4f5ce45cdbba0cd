package shape

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"strings"
	"testing"
	"time"
)

// The test vector of the Standard Webhooks specification.
const (
	testSecret    = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	testMsgID     = "msg_p5jXN8AQM9LWM0D4loKWxJek"
	testTimestamp = 1614265330
	testBody      = `{"test": 2432232314}`
	testSignature = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
)

func TestSignStandardWebhooksVector(t *testing.T) {
	p := mustCompile(t, Spec{Secrets: []string{testSecret}})
	in := Input{ID: testMsgID, ContentType: "application/json", Body: []byte(testBody)}
	r, err := p.Build(t.Context(), in, time.Unix(testTimestamp, 0))
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"webhook-id":        testMsgID,
		"webhook-timestamp": "1614265330",
		"webhook-signature": testSignature,
	} {
		if got := r.Header.Values(k); len(got) != 1 || got[0] != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
}

func TestSignOnePerSecretOverTheBodyAsSent(t *testing.T) {
	other := "whsec_" + base64.StdEncoding.EncodeToString([]byte("the next secret"))
	p := mustCompile(t, Spec{
		Okhi: true, DocumentedOnly: true, Transform: "{id: .v2.user_id, n: 1}", Form: true,
		Secrets: []string{testSecret, other},
	})
	r := build(t, p, input(okhiV2))
	if string(r.Body) != "id=hbZ69KMuYB&n=1" {
		t.Fatalf("body = %q", r.Body)
	}
	sigs := strings.Split(r.Header.Get("Webhook-Signature"), " ")
	if len(sigs) != 2 {
		t.Fatalf("webhook-signature = %q, want two signatures", r.Header.Get("Webhook-Signature"))
	}
	ts := r.Header.Get("Webhook-Timestamp")
	if ts != "1715677999" {
		t.Errorf("webhook-timestamp = %q, want the unix seconds of now, 1715677999", ts)
	}
	for i, secret := range []string{testSecret, other} {
		key, err := DecodeSecret(secret)
		if err != nil {
			t.Fatal(err)
		}
		mac := hmac.New(sha256.New, key)
		mac.Write([]byte("evt_01." + ts + "."))
		mac.Write(r.Body)
		if want := "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil)); sigs[i] != want {
			t.Errorf("signature %d = %q, want %q (over the body as sent)", i, sigs[i], want)
		}
	}
}

func TestSignRefusesAnIDAHeaderCannotCarry(t *testing.T) {
	p := mustCompile(t, Spec{Secrets: []string{testSecret}})
	in := input(`{}`)
	in.ID = "evt\r\nX-Evil: 1"
	if got := buildErr(t, p, in); !strings.Contains(got, "the event id holds a character a header cannot carry") {
		t.Errorf("error = %q", got)
	}
}

func TestDecodeSecret(t *testing.T) {
	key, err := DecodeSecret(testSecret)
	if err != nil || len(key) != 24 {
		t.Errorf("DecodeSecret(%q) = %d bytes, %v; want 24 bytes", testSecret, len(key), err)
	}
	for secret, want := range map[string]string{
		"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw":       "sign standard_webhooks: a secret must start with whsec_ followed by base64",
		"whsec_not base64!":                      "sign standard_webhooks: the secret after whsec_ is not base64: illegal base64 data at input byte 3",
		"whsec_":                                 "sign standard_webhooks: the secret is empty after whsec_",
		"WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw": "sign standard_webhooks: a secret must start with whsec_ followed by base64",
	} {
		if _, err := DecodeSecret(secret); err == nil || err.Error() != want {
			t.Errorf("DecodeSecret(%q) = %v, want %q", secret, err, want)
		}
		// Compile says the same, and never the secret itself.
		_, err := Compile(Spec{URL: testURL, Secrets: []string{secret}})
		if err == nil || err.Error() != want || (len(secret) > 8 && strings.Contains(err.Error(), secret[6:])) {
			t.Errorf("Compile with secret %q: %v, want %q", secret, err, want)
		}
	}
}
