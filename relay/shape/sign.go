package shape

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Headers of the Standard Webhooks scheme (https://www.standardwebhooks.com).
const (
	HeaderWebhookID        = "Webhook-Id"
	HeaderWebhookTimestamp = "Webhook-Timestamp"
	HeaderWebhookSignature = "Webhook-Signature"
)

// DecodeSecret returns the key bytes of a Standard Webhooks secret:
// "whsec_" and standard base64. The messages never hold the secret.
func DecodeSecret(s string) ([]byte, error) {
	rest, ok := strings.CutPrefix(s, "whsec_")
	if !ok {
		return nil, errors.New("sign standard_webhooks: a secret must start with whsec_ followed by base64")
	}
	key, err := base64.StdEncoding.DecodeString(rest)
	if err != nil {
		return nil, fmt.Errorf("sign standard_webhooks: the secret after whsec_ is not base64: %w", err)
	}
	if len(key) == 0 {
		return nil, errors.New("sign standard_webhooks: the secret is empty after whsec_")
	}
	return key, nil
}

// signature is the webhook-signature value: "v1,<base64 HMAC-SHA256 of
// id.timestamp.body>" per key, space-separated, so that a target can
// verify against the old or the new secret while they rotate.
func signature(keys [][]byte, id, ts string, body []byte) string {
	var b strings.Builder
	b.Grow(len(keys) * (len("v1,") + base64.StdEncoding.EncodedLen(sha256.Size) + 1))
	var sum [sha256.Size]byte
	var enc [44]byte // base64 of 32 bytes
	for i, key := range keys {
		mac := hmac.New(sha256.New, key)
		mac.Write([]byte(id))
		mac.Write([]byte{'.'})
		mac.Write([]byte(ts))
		mac.Write([]byte{'.'})
		mac.Write(body)
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString("v1,")
		base64.StdEncoding.Encode(enc[:], mac.Sum(sum[:0]))
		b.Write(enc[:])
	}
	return b.String()
}

// timestamp is the webhook-timestamp value: unix seconds.
func timestamp(now time.Time) string {
	return strconv.FormatInt(now.Unix(), 10)
}
