package store

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// hashID is an id as the relay makes them (relay.Config.EventID hashes
// the event's key fields): uniformly spread, so each lands on its own
// leaf of the id index.
func hashID(n int64) ID {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	sum := sha256.Sum256(b[:])
	var id ID
	copy(id[:], sum[:])
	return id
}

// indexBenchWindow is the dedupe window of the index benchmark, and
// indexBenchGap the time between two of its events.
const (
	indexBenchWindow = 72 * time.Hour
	indexBenchGap    = time.Microsecond
)

// writeKeys puts n dedupe keys of events received before testT0, one
// every indexBenchGap and no longer pending, into the file at path.
func writeKeys(b *testing.B, path string, n int) {
	b.Helper()
	db := openRawNew(b, path)
	defer db.Close()
	const chunk = 100_000
	for from := 0; from < n; from += chunk {
		err := db.Update(func(tx *bolt.Tx) error {
			keys, exps := tx.Bucket(bucketKeys), tx.Bucket(bucketKeyExp)
			exps.FillPercent = appendFill
			for i := from; i < min(from+chunk, n); i++ {
				id := hashID(-int64(i) - 1)
				recv := testT0.Add(-time.Duration(n-i) * indexBenchGap)
				exp := recv.Add(indexBenchWindow).UnixNano()
				if err := keys.Put(id[:], index{expiry: exp, recv: recv.UnixNano()}.encode()); err != nil {
					return err
				}
				if err := exps.Put(expKey(exp, id[:]), nil); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBoltAcceptIndexSize is the durable ack path with its apply
// (ns/op runs until every accepted event is in the file) in a store
// already holding keys dedupe keys, with ids spread as the relay's are
// and receipt times (so expiries) in order. pages/op is what bbolt wrote
// per event. The id index takes each new key on a leaf of its own, so
// what an event costs the file grows with the keys held, which the load
// benchmark's small files do not show. Each round fills a file first:
// run it with -benchtime Nx.
func BenchmarkBoltAcceptIndexSize(b *testing.B) {
	for _, keys := range []int{0, 100_000, 1_000_000} {
		b.Run(fmt.Sprintf("keys=%d", keys), func(b *testing.B) {
			path := filepath.Join(b.TempDir(), "relay.db")
			writeKeys(b, path, keys)
			s, err := OpenBolt(path, BoltOptions{Timeout: time.Second})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			body := []byte(`{"event_type":"address_verification.completed","event_id":"01HZX3Q9W4K2","api_version":"v3","data":{"status":"verified"}}`)
			targets := []string{"legacy"}
			var next atomic.Int64
			before := s.db.Stats()
			b.SetParallelism(32) // 64 Accepts at once on 2 cores, as the load benchmark's 64 connections
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					n := next.Add(1)
					at := testT0.Add(time.Duration(n) * indexBenchGap)
					ev := &Event{ID: hashID(n), ReceivedAt: at, ContentType: "application/json", Body: body}
					if dup, err := s.Accept(context.Background(), ev, targets, AcceptOptions{KeyExpiry: at.Add(indexBenchWindow)}); err != nil || dup {
						b.Errorf("Accept = %v, %v", dup, err)
						return
					}
				}
			})
			if err := s.flush(); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			after := s.db.Stats()
			d := after.Sub(&before)
			b.ReportMetric(float64(d.TxStats.GetWrite())/float64(b.N), "pages/op")
		})
	}
}
