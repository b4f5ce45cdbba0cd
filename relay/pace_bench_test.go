package relay

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// BenchmarkRateAccuracy sends 3,000 events to a target with rate 50/s
// (60 s a run) through one engine, and through two engines on one shared
// store, and reports the rate the target saw between its first and last
// request (want 50/s within 10%):
//
//	go test -run '^$' -bench RateAccuracy -benchtime 1x ./relay/
func BenchmarkRateAccuracy(b *testing.B) {
	for _, instances := range []int{1, 2} {
		b.Run(fmt.Sprintf("instances=%d", instances), func(b *testing.B) {
			for range b.N {
				benchRate(b, instances, 3000, Rate{N: 50, Per: time.Second})
			}
		})
	}
}

func benchRate(b *testing.B, instances, events int, r Rate) {
	var got arrivals
	target := newTestTarget(b, func(http.ResponseWriter, *http.Request, int) { got.add() })
	tc := fastTarget("t", target.URL)
	tc.Concurrency = 8
	tc.Rate = r
	var st store.Store = store.NewMemory(store.MemoryOptions{})
	if instances > 1 {
		st = sharedMemory{st}
	}
	open := func() (store.Store, error) { return st, nil }
	cfg := Config{Targets: []TargetConfig{tc}, MaxPending: events + 1}
	engines := make([]*Engine, instances)
	for i := range engines {
		engines[i] = openEngine(b, cfg, Options{OpenStore: open})
	}
	for i := range events {
		if _, err := engines[i%instances].Receive(b.Context(), []byte(v3Body(fmt.Sprint("rate-", i))), "application/json"); err != nil {
			b.Fatal(err)
		}
	}
	waitFor(b, "every delivery", time.Duration(events)*r.Interval()*2, func() bool { return target.count() >= events })
	times := got.get()
	span := times[len(times)-1].Sub(times[0])
	rate := float64(len(times)-1) / span.Seconds()
	want := float64(r.N) / r.Per.Seconds()
	b.ReportMetric(rate, "req/s")
	b.ReportMetric(100*(rate-want)/want, "%off")
	for _, e := range engines {
		if err := e.Close(); err != nil {
			b.Error(err)
		}
	}
}
