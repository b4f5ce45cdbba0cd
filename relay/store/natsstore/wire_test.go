package natsstore

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
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
