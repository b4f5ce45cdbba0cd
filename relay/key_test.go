package relay

import (
	"strings"
	"testing"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

const (
	v2Verified = `{"v2":{"address_verification_id":"ONYgUOybCU","verification_status":"verified","verification_mode":"first_time","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn","extra_undocumented":{"score":0.91}}}`
	// Same triple, other extra fields and another field order.
	v2VerifiedOther = `{"v2":{"verification_mode":"first_time","user_id":"hbZ69KMuYB","address_verification_id":"ONYgUOybCU","verification_status":"verified","location_id":"C0DTxgjRdn","extra_undocumented":{"score":0.42}}}`
	v2NotAtAddress  = `{"v2":{"address_verification_id":"ONYgUOybCU","verification_status":"not_at_address","verification_mode":"first_time","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn"}}`
	v2Continuous    = `{"v2":{"address_verification_id":"ONYgUOybCU","verification_status":"verified","verification_mode":"continuous","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn"}}`
	v2InProgress    = `{"v2":{"address_verification_id":"ONYgUOybCU","verification_mode":"first_time","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn"}}`
	v3Completed     = `{"event_type":"address_verification.completed","event_id":"01HZX3Q9W4K2","api_version":"v3","event_timestamp":1718000000,"data":{"status":"verified"}}`
	// Same event_id, re-sent with a later timestamp and other data.
	v3CompletedResent = `{"event_id":"01HZX3Q9W4K2","event_type":"address_verification.completed","api_version":"v3","event_timestamp":1718000999,"data":{"status":"verified","extra":true}}`
	v3Other           = `{"event_type":"address_verification.completed","event_id":"01HZX3Q9W4K3","api_version":"v3","event_timestamp":1718000000,"data":{"status":"verified"}}`
	noKeys            = `{"hello":"world"}`
	noKeysSpaced      = `{"hello": "world"}`
)

func eventID(t *testing.T, c Config, body string) store.ID {
	t.Helper()
	c.Targets = []TargetConfig{{Name: "t", URL: "http://127.0.0.1:1/"}}
	c, err := c.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return c.EventID([]byte(body))
}

func TestEventID(t *testing.T) {
	okhi := Config{Source: SourceOkHi}
	generic := Config{Source: SourceGeneric}
	customKeys := Config{Source: SourceGeneric, Dedupe: DedupeConfig{Keys: []string{"order.id", "order.state"}}}
	tests := []struct {
		name string
		cfg  Config
		a, b string
		same bool
	}{
		{"v3 same event_id, other fields differ", okhi, v3Completed, v3CompletedResent, true},
		{"v3 different event_id", okhi, v3Completed, v3Other, false},
		{"v2 same triple, other fields differ", okhi, v2Verified, v2VerifiedOther, true},
		{"v2 different status", okhi, v2Verified, v2NotAtAddress, false},
		{"v2 different mode", okhi, v2Verified, v2Continuous, false},
		{"v2 in progress differs from verified", okhi, v2InProgress, v2Verified, false},
		{"v2 in progress is deterministic", okhi, v2InProgress, v2InProgress, true},
		{"okhi body without key fields is hashed", okhi, noKeys, noKeysSpaced, false},
		{"okhi body without key fields is deterministic", okhi, noKeys, noKeys, true},
		{"generic hashes bytes, not fields", generic, v2Verified, v2VerifiedOther, false},
		{"generic ignores event_id", generic, v3Completed, v3CompletedResent, false},
		{"generic same bytes", generic, v3Completed, v3Completed, true},
		{"generic non-JSON", generic, "plain text", "plain text", true},
		{"custom keys equal", customKeys,
			`{"order":{"id":7,"state":"paid","at":1}}`, `{"order":{"state":"paid","id":7,"at":2}}`, true},
		{"custom keys differ", customKeys,
			`{"order":{"id":7,"state":"paid"}}`, `{"order":{"id":7,"state":"refunded"}}`, false},
		// A key value is compared by its text, as match values are.
		{"custom keys, number and string of one text", customKeys,
			`{"order":{"id":7,"state":"paid"}}`, `{"order":{"id":"7","state":"paid"}}`, true},
		{"custom keys, one present", customKeys,
			`{"order":{"id":7}}`, `{"order":{"id":8}}`, false},
		{"custom keys absent: body hash", customKeys, noKeys, noKeysSpaced, false},
		{"custom keys override okhi defaults", Config{Dedupe: DedupeConfig{Keys: []string{"v2.user_id"}}},
			v2Verified, v2NotAtAddress, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := eventID(t, tt.cfg, tt.a), eventID(t, tt.cfg, tt.b)
			if (a == b) != tt.same {
				t.Errorf("EventID(a) = %s, EventID(b) = %s; same = %v, want %v", a, b, a == b, tt.same)
			}
			if a == (store.ID{}) {
				t.Error("EventID returned the zero id")
			}
		})
	}
}

// TestEventIDKeyVersusBody checks that a key-derived id can never equal a
// body-hash id: a body made of the key's own encoding is still hashed
// apart.
func TestEventIDKeyVersusBody(t *testing.T) {
	c := Config{}
	keyed := eventID(t, c, `{"event_id":"x"}`)
	hashed := eventID(t, c, "event_id=x\x1f")
	if keyed == hashed {
		t.Error("a body hash collides with a key id")
	}
}

func TestEventIDStableAcrossConfigs(t *testing.T) {
	// The same event gets the same id on every instance: the id depends on
	// the key only, not on the relay's name or targets.
	a := eventID(t, Config{Name: "a"}, v3Completed)
	b := eventID(t, Config{Name: "b", MaxPending: 3}, v3Completed)
	if a != b {
		t.Errorf("ids differ across configs: %s vs %s", a, b)
	}
	if got := a.String(); len(got) != 32 || strings.Trim(got, "0123456789abcdef") != "" {
		t.Errorf("String() = %q, want 32 lowercase hex digits", got)
	}
	if back, err := store.ParseID(a.String()); err != nil || back != a {
		t.Errorf("ParseID(String()) = %s, %v; want %s", back, err, a)
	}
}

func TestEventIDDedupeOffIsRandom(t *testing.T) {
	c := Config{Dedupe: DedupeConfig{Off: true}}
	seen := map[store.ID]bool{}
	for range 100 {
		id := eventID(t, c, v3Completed)
		if seen[id] {
			t.Fatalf("dedupe off gave id %s twice", id)
		}
		seen[id] = true
	}
}

func TestTargetMatches(t *testing.T) {
	body := []byte(`{"v2":{"verification_status":"verified","verification_mode":"first_time","score":0.5,"attempts":3,"manual":true,"tags":["a","b"]}}`)
	tests := []struct {
		name  string
		match []Match
		want  bool
	}{
		{"no match lines: everything", nil, true},
		{"one line, value matches", []Match{{"v2.verification_status", []string{"verified"}}}, true},
		{"one line, no value matches", []Match{{"v2.verification_status", []string{"unknown"}}}, false},
		{"values are OR", []Match{{"v2.verification_status", []string{"unknown", "verified"}}}, true},
		{"lines are AND, both hold", []Match{
			{"v2.verification_status", []string{"verified"}},
			{"v2.verification_mode", []string{"first_time"}},
		}, true},
		{"lines are AND, one fails", []Match{
			{"v2.verification_status", []string{"verified"}},
			{"v2.verification_mode", []string{"continuous"}},
		}, false},
		{"missing path: no match", []Match{{"v2.nope", []string{""}}}, false},
		{"missing path with other lines holding", []Match{
			{"v2.verification_status", []string{"verified"}},
			{"v3.event_type", []string{"x"}},
		}, false},
		{"integer value", []Match{{"v2.attempts", []string{"3"}}}, true},
		{"float value", []Match{{"v2.score", []string{"0.5"}}}, true},
		{"bool value", []Match{{"v2.manual", []string{"true"}}}, true},
		{"bool value, other", []Match{{"v2.manual", []string{"false"}}}, false},
		{"array element by index", []Match{{"v2.tags.1", []string{"b"}}}, true},
		{"case matters", []Match{{"v2.verification_status", []string{"Verified"}}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tc := TargetConfig{Match: tt.match}
			if got := tc.Matches(body); got != tt.want {
				t.Errorf("Matches = %v, want %v", got, tt.want)
			}
		})
	}
}

func BenchmarkEventID(b *testing.B) {
	c, err := Config{Targets: []TargetConfig{{Name: "t", URL: "http://127.0.0.1:1/"}}}.WithDefaults()
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct{ name, body string }{
		{"v2", v2Verified},
		{"v2_in_progress", v2InProgress},
		{"v3", v3Completed},
		{"no_keys", noKeys},
	} {
		body := []byte(bc.body)
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				_ = c.EventID(body)
			}
		})
	}
}
