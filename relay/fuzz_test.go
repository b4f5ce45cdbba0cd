package relay

import (
	"bytes"
	"crypto/sha256"
	"strconv"
	"testing"

	"github.com/tidwall/gjson"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// FuzzEventID feeds arbitrary bodies, dedupe key paths and match lines to
// the dedupe-key extraction and the target filters. Seeds are in
// testdata/fuzz/FuzzEventID. Run it with
//
//	go test -run '^$' -fuzz '^FuzzEventID$' -fuzztime 20s ./relay/
//
// Properties: no panic; the id of a body depends on the body and the
// config only (the same input always gives the same id, every source);
// EventID and Matches leave the body as it was; the okhi source picks
// event_id when the body has a non-empty one and the v2 triple otherwise;
// a body without any key field is identified by the hash of its bytes.
func FuzzEventID(f *testing.F) {
	f.Fuzz(func(t *testing.T, body []byte, key1, key2, matchPath, matchValue string) {
		orig := bytes.Clone(body)
		configs := map[string]Config{
			"okhi":          {Source: SourceOkHi},
			"generic":       {Source: SourceGeneric},
			"okhi custom":   {Source: SourceOkHi, Dedupe: DedupeConfig{Keys: []string{key1, key2}}},
			"generic key1":  {Source: SourceGeneric, Dedupe: DedupeConfig{Keys: []string{key1}}},
			"explicit v3":   {Dedupe: DedupeConfig{Keys: okhiV3Key}},
			"explicit v2":   {Dedupe: DedupeConfig{Keys: okhiV2Keys}},
			"generic match": {Source: SourceGeneric, Dedupe: DedupeConfig{Keys: []string{matchPath}}},
		}
		ids := map[string]store.ID{}
		for name, c := range configs {
			id := c.EventID(body)
			if again := c.EventID(bytes.Clone(body)); again != id {
				t.Fatalf("%s: EventID is not deterministic: %s then %s", name, id, again)
			}
			if id == (store.ID{}) {
				t.Errorf("%s: EventID returned the zero id", name)
			}
			ids[name] = id
		}
		if !bytes.Equal(body, orig) {
			t.Fatalf("EventID changed its input: %q became %q", orig, body)
		}

		// The generic source identifies a body by its bytes: the same on
		// every instance and after every restart (and upgrade), so the
		// derivation is pinned here.
		sum := sha256.Sum256(append([]byte("body\x00"), body...))
		if got := ids["generic"]; !bytes.Equal(got[:], sum[:len(got)]) {
			t.Errorf("generic EventID = %s, want the first 16 bytes of SHA-256(\"body\\x00\" + body)", got)
		}

		// The okhi default is the v3 key when the body has a non-empty
		// event_id, else the v2 triple (else, through it, the body hash).
		want := "explicit v2"
		if v := gjson.GetBytes(body, "event_id"); v.Exists() && v.String() != "" {
			want = "explicit v3"
		}
		if ids["okhi"] != ids[want] {
			t.Errorf("okhi EventID = %s, want the id of the %s config, %s", ids["okhi"], want, ids[want])
		}

		// A custom key none of whose paths is in the body falls back to
		// the body hash, whatever the source.
		if !gjson.GetBytes(body, key1).Exists() && ids["generic key1"] != ids["generic"] {
			t.Errorf("key %q is absent from the body but the id %s is not the body hash %s", key1, ids["generic key1"], ids["generic"])
		}

		tc := TargetConfig{Match: []Match{{Path: matchPath, Values: []string{matchValue}}}}
		m := tc.Matches(body)
		if again := tc.Matches(bytes.Clone(body)); again != m {
			t.Fatalf("Matches is not deterministic: %v then %v", m, again)
		}
		if m && gjson.GetBytes(body, matchPath).String() != matchValue {
			t.Errorf("Matches(%q = %q) holds but the body's value there is %q", matchPath, matchValue, gjson.GetBytes(body, matchPath).String())
		}
		// A second value on the line can only widen the match (OR), a
		// second line only narrow it (AND).
		or := TargetConfig{Match: []Match{{Path: matchPath, Values: []string{matchValue, key1}}}}
		if m && !or.Matches(body) {
			t.Error("adding a value to a match line lost a match")
		}
		and := TargetConfig{Match: []Match{tc.Match[0], {Path: key1, Values: []string{key2}}}}
		if !m && and.Matches(body) {
			t.Error("adding a match line made a match")
		}
		if (&TargetConfig{}).Matches(body) != true {
			t.Error("a target without match lines does not take every event")
		}
		if !bytes.Equal(body, orig) {
			t.Fatalf("Matches changed its input: %q became %q", orig, body)
		}
	})
}

// TestEventIDKeyEncodingIsInjective: two events whose key fields differ
// must not share an event_id, or the second is acked as a duplicate of the
// first and never delivered.
func TestEventIDKeyEncodingIsInjective(t *testing.T) {
	c := Config{Source: SourceGeneric, Dedupe: DedupeConfig{Keys: []string{"a", "b"}}}
	// The values carry the separators keyID writes between fields.
	x := `{"a":"x\u001fb=y","b":"z"}`
	y := `{"a":"x","b":"y\u001fb=z"}`
	if gjson.Get(x, "a").String() == gjson.Get(y, "a").String() {
		t.Fatal("the two bodies have the same key values: the test is wrong")
	}
	a, b := c.EventID([]byte(x)), c.EventID([]byte(y))
	if a == b {
		t.Fatal("key values that contain separator bytes collide: " + strconv.Quote(x) + " and " + strconv.Quote(y) +
			" both get event_id " + a.String() + " (the second would be acked as a duplicate and never delivered); " +
			"keyID must length-prefix each path and value")
	}
}
