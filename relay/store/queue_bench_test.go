package store

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// openRawNew makes a new store file at path and opens it with bbolt
// alone, unsynced, for a benchmark to fill faster than Accepts could.
func openRawNew(b *testing.B, path string) *bolt.DB {
	b.Helper()
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	return db
}

// writeBacklog writes n pending deliveries at target "a" straight into a
// new file in the format-1 layout (a relay's Accepts would take minutes to
// write a million): events 0..n-1 received at testT0 + i ns, fresh, with
// dedupe keys; with order keys too (i mod orderKeys) if orderKeys is
// above zero.
func writeBacklog(b *testing.B, path string, n, orderKeys int) {
	b.Helper()
	db := openRawNew(b, path)
	defer db.Close()
	const chunk = 100_000
	for from := 0; from < n; from += chunk {
		err := db.Update(func(tx *bolt.Tx) error {
			events, keys, exps := tx.Bucket(bucketEvents), tx.Bucket(bucketKeys), tx.Bucket(bucketKeyExp)
			pb, err := tx.Bucket(bucketPending).CreateBucketIfNotExists([]byte("a"))
			if err != nil {
				return err
			}
			for _, bk := range []*bolt.Bucket{events, keys, exps, pb} {
				bk.FillPercent = appendFill
			}
			exp := testT0.Add(time.Hour).UnixNano()
			for i := from; i < min(from+chunk, n); i++ {
				ev := &Event{ID: testID(i), ReceivedAt: testT0.Add(time.Duration(i)), ContentType: "application/json", Body: []byte(`{"n":1}`)}
				ref := makeRef(ev.ReceivedAt, ev.ID)
				if err := events.Put(ref, encodeEvent(1, 0, ev)); err != nil {
					return err
				}
				if err := keys.Put(ev.ID[:], index{expiry: exp, recv: ev.ReceivedAt.UnixNano()}.encode()); err != nil {
					return err
				}
				if err := exps.Put(expKey(exp, ev.ID[:]), nil); err != nil {
					return err
				}
				// A fresh delivery: no attempts, due at receipt.
				d := make([]byte, 32)
				binary.BigEndian.PutUint64(d[4:], uint64(ev.ReceivedAt.UnixNano()))
				if orderKeys > 0 {
					d = encodeDelivery(&Delivery{NextAt: ev.ReceivedAt, OrderKey: fmt.Sprintf("key-%d", i%orderKeys)}, uint64(i+1))
				}
				if err := pb.Put(ref, d); err != nil {
					return err
				}
			}
			return addPendingEvents(tx, min(from+chunk, n)-from)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBoltRestart opens a file with a backlog of a million pending
// deliveries: first-take is how long after OpenBolt the first delivery
// is handed out (the load runs in the background), ns/op the open until
// everything is queued, and the close.
//
// 1M-keyed has an order key on each (10,000 keys) and an ordered queue,
// which hands out no keyed delivery before the load is done.
func BenchmarkBoltRestart(b *testing.B) {
	// The sub-benchmarks run once per b.N: the files are written once.
	dir := b.TempDir()
	b.Run("1M", func(b *testing.B) { benchmarkRestart(b, filepath.Join(dir, "plain.db"), 0) })
	b.Run("1M-keyed", func(b *testing.B) { benchmarkRestart(b, filepath.Join(dir, "keyed.db"), 10_000) })
}

func benchmarkRestart(b *testing.B, path string, keys int) {
	const n = 1_000_000
	if _, err := os.Stat(path); err != nil {
		writeBacklog(b, path, n, keys)
	}
	b.ResetTimer()
	clock := newFakeClock(testT0.Add(time.Second))
	{
		var first time.Duration
		for range b.N {
			began := time.Now()
			s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
			if err != nil {
				b.Fatal(err)
			}
			q, err := s.Queue("a", QueueOptions{Lease: time.Minute, Ordered: keys > 0})
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			l, err := q.Take(ctx)
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			first += time.Since(began)
			l.Postpone(clock.Now())
			<-s.Loaded()
			if c, _ := s.Counts(context.Background()); c.Targets["a"].Pending != n {
				b.Fatalf("%d pending after the load, want %d", c.Targets["a"].Pending, n)
			}
			if err := s.Close(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(first.Microseconds())/float64(b.N)/1000, "ms-first-take")
	}
}

// BenchmarkMemoryTakeSettle cycles deliveries of a queue holding 100,000:
// take one, settle it as a retry due at once.
func BenchmarkMemoryTakeSettle(b *testing.B) {
	const n = 100_000
	s := NewMemory(MemoryOptions{Now: func() time.Time { return testT0.Add(time.Second) }})
	defer s.Close()
	ctx := context.Background()
	for i := range n {
		ev := testEvent(i, testT0.Add(time.Duration(i)))
		if _, err := s.Accept(ctx, ev, []string{"a"}, AcceptOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	q, err := s.Queue("a", QueueOptions{Lease: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		l, err := q.Take(ctx)
		if err != nil {
			b.Fatal(err)
		}
		d := l.Delivery()
		d.Attempts++
		d.NextAt = testT0.Add(time.Duration(n))
		l.Settle(Retry, &d, nil)
	}
}
