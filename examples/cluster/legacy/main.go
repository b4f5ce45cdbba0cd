// Command legacy is the cluster example's stand-in for an internal
// service: it answers the relay's deliveries and counts them by
// Idempotency-Key, so that run.sh can check that every event arrived once
// whichever Caddy instance accepted or delivered it.
//
//	go run ./examples/cluster/legacy -addr 127.0.0.1:9099 -fail 0.1
//
// POST (any path): 200, or 503 for a share -fail of requests so that the
// relay's retries show; 400 without an Idempotency-Key.
// GET /stats: {"requests":N,"failed":F,"distinct":M,"duplicates":K}, where
// distinct counts the keys answered 200 and duplicates the 200s for a key
// answered 200 before.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9099", "address to listen on")
	fail := flag.Float64("fail", 0, "share of deliveries answered 503, in [0, 1)")
	flag.Parse()
	if err := run(*addr, *fail); err != nil {
		fmt.Fprintln(os.Stderr, "legacy:", err)
		os.Exit(1)
	}
}

func run(addr string, fail float64) error {
	if fail < 0 || fail >= 1 {
		return fmt.Errorf("-fail %v: want a share in [0, 1)", fail)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	srv := &http.Server{
		Handler:           newService(func() bool { return rand.Float64() < fail }),
		ReadHeaderTimeout: 5 * time.Second,
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	slog.Info("legacy stand-in listening", "addr", ln.Addr().String(), "fail", fail)
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serving: %w", err)
	}
	return nil
}

// stats is what GET /stats answers.
type stats struct {
	Requests   int `json:"requests"`
	Failed     int `json:"failed"`
	Distinct   int `json:"distinct"`
	Duplicates int `json:"duplicates"`
}

type service struct {
	fail func() bool // whether to refuse this delivery with a 503

	mu    sync.Mutex
	seen  map[string]struct{}
	stats stats
}

func newService(fail func() bool) *service {
	return &service{fail: fail, seen: map[string]struct{}{}}
}

func (s *service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Path == "/stats" {
		s.mu.Lock()
		st := s.stats
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(st)
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		http.Error(w, "POST a delivery, or GET /stats", http.StatusMethodNotAllowed)
		return
	}
	// Read the body as a real service would, so that a delivery cut short
	// does not count.
	if _, err := io.Copy(io.Discard, io.LimitReader(r.Body, 1<<20)); err != nil {
		http.Error(w, "reading body", http.StatusBadRequest)
		return
	}
	key := r.Header.Get("Idempotency-Key")

	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats.Requests++
	switch {
	case key == "":
		http.Error(w, "no Idempotency-Key", http.StatusBadRequest)
		return
	case s.fail():
		s.stats.Failed++
		http.Error(w, "try again", http.StatusServiceUnavailable)
		return
	}
	if _, dup := s.seen[key]; dup {
		s.stats.Duplicates++
	} else {
		s.seen[key] = struct{}{}
		s.stats.Distinct++
	}
	w.WriteHeader(http.StatusOK)
}
