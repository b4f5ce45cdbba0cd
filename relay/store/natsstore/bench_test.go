package natsstore

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

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

// BenchmarkJetStreamFloor is the least any relay on JetStream can do per
// event with the server fsyncing every write (sync_interval: always, as
// the load benchmark's relay-nats row runs it): publish the delivery to a
// work-queue stream and the dedupe key to a stream of its own (two
// synced writes, one after the other, as an ack must wait for both), while
// a consumer acks each delivery as it comes (a removal: a synced
// tombstone). No dedupe reads, no relay, no HTTP: the floor under the
// relay-nats row, in the same way BenchmarkFdatasync is bbolt's.
//
// burst: 64 goroutines as fast as they go (events/s). paced: one event
// every millisecond, 1,000/s, each its own goroutine (ack p50, p99).
// shards: the deliveries and keys spread over that many streams each, so
// that their fsyncs are in flight at once (JetStream fsyncs one message at
// a time per stream).
func BenchmarkJetStreamFloor(b *testing.B) {
	for _, shards := range []int{1, 4} {
		b.Run(fmt.Sprintf("burst/shards=%d", shards), func(b *testing.B) {
			f := newFloor(b, shards)
			var n atomic.Int64
			b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := f.event(int(n.Add(1))); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
		})
		b.Run(fmt.Sprintf("paced/shards=%d", shards), func(b *testing.B) {
			f := newFloor(b, shards)
			lat := make([]time.Duration, b.N)
			var wg sync.WaitGroup
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			b.ResetTimer()
			for i := range b.N {
				<-tick.C
				wg.Go(func() {
					t0 := time.Now()
					if err := f.event(i); err != nil {
						b.Error(err)
					}
					lat[i] = time.Since(t0)
				})
			}
			wg.Wait()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}

// floor is BenchmarkJetStreamFloor's streams and consumers.
type floor struct {
	js           jetstream.JetStream
	deliveries   []string // a work-queue stream per shard
	keys         []string // a stream per shard
	body, expiry []byte
}

func newFloor(b *testing.B, shards int) *floor {
	ns := startNATSWith(b, func(o *server.Options) { o.SyncAlways = true })
	nc, err := nats.Connect(ns.url())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	f := &floor{js: js, body: make([]byte, 300), expiry: make([]byte, 8)}
	ctx := context.Background()
	for i := range shards {
		d := fmt.Sprintf("DELIVERIES_%d", i)
		st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: d, Subjects: []string{d + ".>"},
			Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage})
		if err != nil {
			b.Fatal(err)
		}
		c, err := st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "crm",
			AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: -1})
		if err != nil {
			b.Fatal(err)
		}
		cc, err := c.Consume(func(m jetstream.Msg) { _ = m.Ack() })
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(cc.Stop)
		k := fmt.Sprintf("KEYS_%d", i)
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: k, Subjects: []string{k + ".>"},
			Storage: jetstream.FileStorage, AllowMsgTTL: true}); err != nil {
			b.Fatal(err)
		}
		f.deliveries, f.keys = append(f.deliveries, d), append(f.keys, k)
	}
	return f
}

// event stores event n's delivery, then its key, each once.
func (f *floor) event(n int) error {
	ctx := context.Background()
	id := strconv.Itoa(n)
	d, k := f.deliveries[n%len(f.deliveries)], f.keys[n%len(f.keys)]
	if _, err := f.js.Publish(ctx, d+".crm."+id, f.body, jetstream.WithExpectLastSequencePerSubject(0)); err != nil {
		return err
	}
	_, err := f.js.Publish(ctx, k+"."+id, f.expiry, jetstream.WithExpectLastSequencePerSubject(0), jetstream.WithMsgTTL(time.Hour))
	return err
}
