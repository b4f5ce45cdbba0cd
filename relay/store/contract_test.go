package store_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store/storetest"
)

// wake wakes the waiting Takes of a store whose timers run on real time
// while the suite's clock is fake.
func wake(s store.Store) {
	if w, ok := s.(interface{ Wake() }); ok {
		w.Wake()
	}
}

func TestMemoryContract(t *testing.T) {
	storetest.Run(t, storetest.Harness{
		Open: func(_ testing.TB, now func() time.Time) store.Store {
			return store.NewMemory(store.MemoryOptions{Now: now})
		},
		Wake: wake,
	})
}

// TestMemoryContractRealClock runs the suite's real-clock waits (those a
// JetStream backend gets) against a store known to keep the contract, so
// that they are checked without a NATS server.
func TestMemoryContractRealClock(t *testing.T) {
	if testing.Short() {
		t.Skip("waits out real delays")
	}
	storetest.Run(t, storetest.Harness{
		Open: func(_ testing.TB, now func() time.Time) store.Store {
			return store.NewMemory(store.MemoryOptions{Now: now})
		},
		RealClock: true,
	})
}

func TestBoltContract(t *testing.T) {
	open := func(t testing.TB, path string, now func() time.Time) store.Store {
		t.Helper()
		s, err := store.OpenBolt(path, store.BoltOptions{Timeout: time.Second, Now: now})
		if err != nil {
			t.Fatalf("OpenBolt: %v", err)
		}
		return s
	}
	storetest.Run(t, storetest.Harness{
		Open: func(t testing.TB, now func() time.Time) store.Store {
			return open(t, filepath.Join(t.TempDir(), "relay.db"), now)
		},
		Reopen: func(t testing.TB, s store.Store, now func() time.Time) store.Store {
			t.Helper()
			path := s.(*store.Bolt).Path()
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			return open(t, path, now)
		},
		Wake: wake,
	})
}
