package storetest

import (
	"errors"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// testKeyStates: a record is created at revision 0, written only at its
// current revision, read with it, and gone at its expiry.
func testKeyStates(t *testing.T, h Harness) {
	e := newEnv(t, h)
	now := e.c.Now()
	const space, key = "order", "k1"
	wantNone := func(space, key string) {
		t.Helper()
		if v, rev, err := e.s.State(t.Context(), space, key, e.c.Now()); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("State(%s, %s) = %q, %d, %v; want ErrNotFound", space, key, v, rev, err)
		}
	}
	wantState := func(space, key, value string, rev uint64) {
		t.Helper()
		v, r, err := e.s.State(t.Context(), space, key, e.c.Now())
		if err != nil || string(v) != value || r != rev {
			t.Errorf("State(%s, %s) = %q, %d, %v; want %q, %d", space, key, v, r, err, value, rev)
		}
	}
	set := func(space, key, value string, rev uint64, expiry time.Time) uint64 {
		t.Helper()
		buf := []byte(value)
		r, err := e.s.SetState(t.Context(), space, key, buf, rev, expiry)
		if err != nil {
			t.Fatalf("SetState(%s, %s, %q, rev %d): %v", space, key, value, rev, err)
		}
		if r == 0 || r == rev {
			t.Errorf("SetState(%s, %s, rev %d) = revision %d, want a new one", space, key, rev, r)
		}
		// The caller may reuse its buffer.
		copy(buf, "XXXXXXXX")
		return r
	}
	conflict := func(rev uint64, why string) {
		t.Helper()
		if r, err := e.s.SetState(t.Context(), space, key, []byte("lost"), rev, now.Add(24*time.Hour)); !errors.Is(err, store.ErrConflict) {
			t.Errorf("SetState at %s = %d, %v; want ErrConflict", why, r, err)
		}
	}

	wantNone(space, key)
	long := now.Add(24 * time.Hour)
	r1 := set(space, key, "first", 0, long)
	wantState(space, key, "first", r1)
	conflict(0, "revision 0 over a record")
	conflict(r1+1000, "a revision never written")
	r2 := set(space, key, "second", r1, long)
	wantState(space, key, "second", r2)
	conflict(r1, "a stale revision")
	wantState(space, key, "second", r2)

	// Spaces and keys are apart.
	wantNone("other", key)
	wantNone(space, "k2")
	r := set("other", key, "elsewhere", 0, long)
	wantState("other", key, "elsewhere", r)
	wantState(space, key, "second", r2)

	// An expired record is gone, and created anew at revision 0.
	expiry := e.c.Now().Add(e.keyTTL)
	r3 := set(space, "short", "brief", 0, expiry)
	wantState(space, "short", "brief", r3)
	e.after(t, expiry, "state still there at its expiry", func() bool {
		_, _, err := e.s.State(t.Context(), space, "short", e.c.Now())
		return errors.Is(err, store.ErrNotFound)
	})
	r4 := set(space, "short", "anew", 0, e.c.Now().Add(24*time.Hour))
	wantState(space, "short", "anew", r4)
	wantState(space, key, "second", r2)
}
