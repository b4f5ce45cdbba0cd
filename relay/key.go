package relay

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"

	"github.com/tidwall/gjson"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// okhiV3Key and okhiV2Keys are the default dedupe keys of SourceOkHi.
var (
	okhiV3Key  = []string{"event_id"}
	okhiV2Keys = []string{"v2.address_verification_id", "v2.verification_status", "v2.verification_mode"}
)

// EventID derives an event's id from its dedupe key, so that the same event
// gets the same id on every instance and after every restart: the first 16
// bytes of SHA-256 over the key's paths and values, or over the body when
// none of the key's fields is present. With dedupe off, ids are random.
func (c *Config) EventID(body []byte) store.ID {
	if c.Dedupe.Off {
		var id store.ID
		_, _ = rand.Read(id[:])
		return id
	}
	paths := c.Dedupe.Keys
	if len(paths) == 0 && c.Source != SourceGeneric {
		if v := gjson.GetBytes(body, okhiV3Key[0]); v.Exists() && v.String() != "" {
			paths = okhiV3Key
		} else {
			paths = okhiV2Keys
		}
	}
	return keyID(paths, body)
}

func keyID(paths []string, body []byte) store.ID {
	h := sha256.New()
	found := false
	var buf [256]byte
	b := buf[:0]
	// Every path and value is length-prefixed, so that no two different
	// keys encode alike whatever bytes their values hold.
	for _, p := range paths {
		v := gjson.GetBytes(body, p)
		b = binary.AppendUvarint(b, uint64(len(p)))
		b = append(b, p...)
		if !v.Exists() {
			b = append(b, 0)
			continue
		}
		found = true
		val := v.Raw
		if v.Type == gjson.String {
			val = v.Str
		}
		b = append(b, 1)
		b = binary.AppendUvarint(b, uint64(len(val)))
		b = append(b, val...)
	}
	var sum [sha256.Size]byte
	if found {
		h.Write([]byte("key\x00"))
		h.Write(b)
	} else {
		h.Write([]byte("body\x00"))
		h.Write(body)
	}
	h.Sum(sum[:0])
	var id store.ID
	copy(id[:], sum[:])
	return id
}

// Matches reports whether body passes every match line of t.
func (t *TargetConfig) Matches(body []byte) bool {
	for _, m := range t.Match {
		v := gjson.GetBytes(body, m.Path)
		if !v.Exists() {
			return false
		}
		s := v.String()
		ok := false
		for _, want := range m.Values {
			if s == want {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// orderKey is an event's order key at a target with order_by path: the
// value at the path as raw JSON (so that "1" and 1 differ, and a string's
// quotes keep it from being read as a number), "" when the body has none.
func orderKey(body []byte, path string) string {
	v := gjson.GetBytes(body, path)
	if !v.Exists() || v.Type == gjson.Null {
		return ""
	}
	if v.Type == gjson.String {
		// One spelling per string, whatever its escapes.
		return "s" + v.Str
	}
	return "r" + v.Raw
}
