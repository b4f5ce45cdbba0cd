package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// BenchmarkServeHTTP is one whole ack: auth, body read, JSON check, key,
// dedupe, durable store write (bbolt with fsync, or memory), answer; 20%
// of the requests are exact re-sends. Delivery runs in the background to
// a local target, as in production.
func BenchmarkServeHTTP(b *testing.B) {
	for _, storage := range []string{"bolt", StorageMemory} {
		b.Run(storage, func(b *testing.B) {
			var delivered atomic.Int64
			target := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
				_, _ = io.Copy(io.Discard, r.Body)
				delivered.Add(1)
			}))
			defer target.Close()
			var cfg caddy.Config
			if err := json.Unmarshal([]byte(`{"logging":{"logs":{"default":{"writer":{"output":"discard"}}}}}`), &cfg); err != nil {
				b.Fatal(err)
			}
			ctx, err := caddy.ProvisionContext(&cfg)
			if err != nil {
				b.Fatal(err)
			}
			raw := `{"backend":"memory"}`
			if storage == "bolt" {
				raw = fmt.Sprintf(`{"backend":"bolt","dir":%q}`, b.TempDir())
			}
			h := &Handler{
				Name:       "bench-" + storage,
				Auth:       &Auth{Header: "okhi-authorization", Values: []string{"s3cret"}},
				StorageRaw: json.RawMessage(raw),
				Targets:    []Target{{Name: "sink", URL: target.URL, BackoffMin: caddy.Duration(time.Second)}},
			}
			if err := h.Provision(ctx); err != nil {
				b.Fatal(err)
			}
			defer func() { _ = h.Cleanup() }()
			app, err := ctx.App(appID)
			if err != nil {
				b.Fatal(err)
			}
			if err := app.(*App).Start(); err != nil {
				b.Fatal(err)
			}
			var seq atomic.Int64
			b.ReportAllocs()
			// Deliveries run beside the acks and take their share of the
			// time and allocations: report how many made it in.
			defer func() { b.ReportMetric(float64(delivered.Load())/float64(b.N), "deliveries/op") }()
			b.SetParallelism(32) // concurrent requests share a commit
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					n := seq.Add(1)
					if n%5 == 0 {
						n -= 4 // an exact re-send
					}
					body := fmt.Appendf(nil, `{"v2":{"address_verification_id":"b%d","verification_status":"verified","verification_mode":"first_time","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn"}}`, n)
					r := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
					r.Header.Set("Okhi-Authorization", "s3cret")
					r.Header.Set("Content-Type", "application/json")
					w := httptest.NewRecorder()
					_ = h.ServeHTTP(w, r, nil)
					if w.Code != http.StatusOK {
						b.Fatalf("status %d: %s", w.Code, w.Body)
					}
				}
			})
		})
	}
}
