package natsstore

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// BenchmarkAcceptParallel: Accepts of new events to one target from 64
// goroutines, with the server fsyncing every write (sync_interval:
// always, as the load benchmark's relay-nats row runs it) and on its own
// schedule: the difference is what JetStream's fsync per message costs,
// since it has no group commit.
func BenchmarkAcceptParallel(b *testing.B) {
	for _, sync := range []struct {
		name   string
		always bool
	}{{"sync_always", true}, {"sync_interval", false}} {
		b.Run(sync.name, func(b *testing.B) {
			ns := startNATSWith(b, func(o *server.Options) { o.SyncAlways = sync.always })
			s := openUp(b, testConfig(ns.url(), nil))
			b.Cleanup(func() { s.Close() })
			var n atomic.Int64
			b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					var id store.ID
					copy(id[:], fmt.Sprintf("bench-%010d", n.Add(1)))
					now := time.Now()
					ev := &store.Event{ID: id, ReceivedAt: now, ContentType: "application/json", Body: []byte(`{"n":1}`)}
					opts := store.AcceptOptions{KeyExpiry: now.Add(time.Hour), MaxPending: 1000000}
					if _, err := s.Accept(context.Background(), ev, []string{"crm"}, opts); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
