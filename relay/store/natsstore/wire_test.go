package natsstore

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

func TestServerVersion(t *testing.T) {
	for _, tt := range []struct {
		v      string
		ok, at bool // parsed; 2.11 or later
	}{
		{"2.11.0", true, true},
		{"2.15.2", true, true},
		{"3.0.0", true, true},
		{"2.10.24", true, false},
		{"2.9.0-beta", true, false},
		{"", false, false},
		{"junk", false, false},
	} {
		major, minor, ok := serverVersion(tt.v)
		at := ok && (major > 2 || major == 2 && minor >= 11)
		if ok != tt.ok || at != tt.at {
			t.Errorf("serverVersion(%q) = %d.%d, %v: want parsed %v, new enough %v", tt.v, major, minor, ok, tt.ok, tt.at)
		}
	}
}

func TestCheckStream(t *testing.T) {
	s := &Store{cfg: Config{Replicas: 3}, n: namesFor("S")}
	want := s.streamConfig()
	if err := checkStream(want, want); err != nil {
		t.Errorf("checkStream(same) = %v", err)
	}
	have := want
	have.Replicas, have.Subjects = 1, []string{"S.>"}
	err := checkStream(have, want)
	if err == nil {
		t.Fatal("checkStream(other replicas and subjects) = nil")
	}
	for _, part := range []string{"replicas 1", "says 3", `"S.>"`, `"S.d.>"`} {
		if !strings.Contains(err.Error(), part) {
			t.Errorf("checkStream error %q does not name %s", err, part)
		}
	}
	have = want
	have.Retention = jetstream.InterestPolicy
	if err := checkStream(have, want); err == nil || !strings.Contains(err.Error(), "interest") {
		t.Errorf("checkStream(interest retention) = %v", err)
	}
}

func TestStateKey(t *testing.T) {
	short := stateKey("order", "k")
	long := stateKey("order", strings.Repeat("k", 5000))
	if len(long) > 100 || !strings.HasPrefix(long, "=") {
		t.Errorf("stateKey of a long key = %q, want a short hashed one", long)
	}
	if short == stateKey("orderk", "") || short == stateKey("order", "k2") {
		t.Error("stateKey collides")
	}
	for _, k := range []string{short, long} {
		if strings.ContainsAny(k, ". *>") {
			t.Errorf("stateKey %q is not one subject token", k)
		}
	}
}

func TestSubjects(t *testing.T) {
	n := namesFor("S")
	var id store.ID
	copy(id[:], "subject-test")
	kt := keyToken("customer 42")
	for _, tt := range []struct {
		subj, target, keyTok string
	}{
		{n.pendingSubject("crm", "", id), "crm", ""},
		{n.pendingSubject("crm", kt, id), "crm", kt},
		{n.pendingSubject(token("with.dot"), kt, id), "with.dot", kt},
		{n.deadSubject("crm", id), "crm", ""},
	} {
		target, keyTok, got, err := splitSubject(tt.subj)
		if err != nil || target != tt.target || keyTok != tt.keyTok || got != id {
			t.Errorf("splitSubject(%q) = %q, %q, %s, %v; want %q, %q, %s", tt.subj, target, keyTok, got, err, tt.target, tt.keyTok, id)
		}
		if tok := subjectToken(tt.subj); tok != token(tt.target) {
			t.Errorf("subjectToken(%q) = %q, want %q", tt.subj, tok, token(tt.target))
		}
	}
	for _, bad := range []string{"S.d.crm", "S.d.crm.k.k2." + id.String(), "S.d.crm.nothex", "S"} {
		if _, _, _, err := splitSubject(bad); err == nil {
			t.Errorf("splitSubject(%q) = nil error", bad)
		}
	}
	if got, want := n.keyFilter("crm", kt), "S.d.crm."+kt+".*"; got != want {
		t.Errorf("keyFilter = %q, want %q", got, want)
	}
}

func TestOrderKeyEncoding(t *testing.T) {
	seen := map[string]string{}
	for _, key := range []string{"k", "K", "customer 42", "a.b*c>", "line\r\nInjected: 1", `"quoted"`, "ünïcode ✓", strings.Repeat("x", 5000)} {
		tok := keyToken(key)
		if len(tok) != 22 || strings.ContainsAny(tok, ". *>") {
			t.Errorf("keyToken(%.20q) = %q: want 22 characters of one subject token", key, tok)
		}
		if prev, ok := seen[tok]; ok {
			t.Errorf("keyToken of %.20q and %.20q collide", prev, key)
		}
		seen[tok] = key
		v := encodeOrderKey(key)
		if strings.ContainsAny(v, "\r\n") {
			t.Errorf("encodeOrderKey(%.20q) = %.40q: not a header value", key, v)
		}
		if back := decodeOrderKey(v); back != key {
			t.Errorf("decodeOrderKey(encodeOrderKey(%.20q)) = %.20q", key, back)
		}
	}
}
