package relay

import (
	"encoding/binary"
	"runtime"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// BenchmarkDedupeMemory reports the heap cost of a full LRU of one million
// keys (issue target: at most 100 MB over the baseline).
func BenchmarkDedupeMemory(b *testing.B) {
	const n = 1_000_000
	for range b.N {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		d := newDedupe(n, nil)
		now := time.Unix(1e9, 0)
		for i := range n {
			var id store.ID
			binary.BigEndian.PutUint64(id[:], uint64(i))
			d.add(id, now.Add(time.Hour), now)
		}
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "MB/1M-keys")
		runtime.KeepAlive(d)
	}
}
