package caddymodule

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// simOptions are the simulate command's flags.
type simOptions struct {
	URL        string
	Headers    http.Header
	Events     int
	Rate       float64 // events per second
	Duplicates float64 // share of sends that re-send an earlier event's exact bytes
	Version    string  // v2 or v3
	// OkHi's behaviour: it waits 15 s for an answer and retries failed
	// calls for a few minutes with exponential backoff.
	Timeout    time.Duration
	Attempts   int
	RetryAfter time.Duration // first retry delay, doubled each time
	// Progress, when not nil, gets a live progress line (a terminal).
	Progress io.Writer
}

// simSummary is what a simulation saw.
type simSummary struct {
	Events     int            // distinct events
	Sends      int            // sends, re-sends of an earlier event included
	Requests   int            // HTTP requests, retries included
	Statuses   map[int]int    // answers by status
	Results    map[string]int // accepted / duplicate from 200 bodies
	Errors     int            // requests without an answer
	GaveUp     int            // sends that never got a 2xx
	EventIDs   map[string]bool
	Latencies  []time.Duration
	FirstError string
}

// simulate sends OkHi-shaped events the way OkHi does.
func simulate(ctx context.Context, o simOptions) (*simSummary, error) {
	if o.URL == "" {
		return nil, fmt.Errorf("--url is required")
	}
	if o.Version != "v2" && o.Version != "v3" {
		return nil, fmt.Errorf("--version must be v2 or v3, not %q", o.Version)
	}
	if o.Events <= 0 || o.Rate <= 0 || o.Duplicates < 0 || o.Duplicates >= 1 {
		return nil, fmt.Errorf("--events and --rate must be positive, --duplicates in [0, 1)")
	}
	client := &http.Client{Timeout: o.Timeout}
	s := &simSummary{Statuses: map[int]int{}, Results: map[string]int{}, EventIDs: map[string]bool{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	var sent [][]byte
	tick := time.NewTicker(time.Duration(float64(time.Second) / o.Rate))
	defer tick.Stop()
	if o.Progress != nil {
		stop := showProgress(o.Progress, o.Events, s, &mu)
		defer stop()
	}
	for s.Events < o.Events {
		var body []byte
		mu.Lock() // the progress line reads the counts
		if len(sent) > 0 && mrand.Float64() < o.Duplicates {
			body = sent[mrand.IntN(len(sent))]
		} else {
			body = okhiBody(o.Version)
			sent = append(sent, body)
			s.Events++
		}
		s.Sends++
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			sendLikeOkHi(ctx, client, o, body, s, &mu)
		}()
		select {
		case <-ctx.Done():
			wg.Wait()
			return s, ctx.Err()
		case <-tick.C:
		}
	}
	wg.Wait()
	return s, nil
}

func sendLikeOkHi(ctx context.Context, c *http.Client, o simOptions, body []byte, s *simSummary, mu *sync.Mutex) {
	wait := o.RetryAfter
	for attempt := 1; attempt <= o.Attempts; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, o.URL, bytes.NewReader(body))
		if err != nil {
			return
		}
		req.Header = o.Headers.Clone()
		req.Header.Set("Content-Type", "application/json")
		start := time.Now()
		resp, err := c.Do(req)
		took := time.Since(start)
		var answer struct {
			Status  string `json:"status"`
			EventID string `json:"event_id"`
		}
		status := 0
		if err == nil {
			status = resp.StatusCode
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if status == http.StatusOK {
				_ = json.Unmarshal(b, &answer)
			}
		}
		mu.Lock()
		s.Requests++
		s.Latencies = append(s.Latencies, took)
		if err != nil {
			s.Errors++
			if s.FirstError == "" {
				s.FirstError = err.Error()
			}
		} else {
			s.Statuses[status]++
			if answer.Status != "" {
				s.Results[answer.Status]++
				s.EventIDs[answer.EventID] = true
			}
		}
		mu.Unlock()
		if err == nil && status >= 200 && status < 300 {
			return
		}
		if attempt == o.Attempts {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait *= 2
	}
	mu.Lock()
	s.GaveUp++
	mu.Unlock()
}

var (
	simStatuses = []string{"verified", "not_at_address", "unknown", "unverifiable"}
	simModes    = []string{"first_time", "continuous"}
	simEvents   = []string{"address.collected", "address_verification.started", "address_verification.completed", "address_verification.cancelled"}
)

// okhiBody renders one event. v2 bodies sometimes lack a status (in
// progress) and carry undocumented extra fields, as OkHi's do.
func okhiBody(version string) []byte {
	id := randomID(10)
	if version == "v3" {
		return fmt.Appendf(nil, `{"event_type":%q,"event_id":%q,"api_version":"v3","event_timestamp":%d,`+
			`"data":{"usage_types":["digital_verification"],"user":{"id":%q},"location":{"id":%q},`+
			`"address_verification":{"id":%q,"status":%q}}}`,
			simEvents[mrand.IntN(len(simEvents))], randomID(26), time.Now().Unix(), randomID(10), randomID(10), id,
			simStatuses[mrand.IntN(len(simStatuses))])
	}
	status := ""
	if mrand.IntN(5) > 0 {
		status = fmt.Sprintf(`"verification_status":%q,`, simStatuses[mrand.IntN(len(simStatuses))])
	}
	return fmt.Appendf(nil, `{"v2":{"address_verification_id":%q,%s"verification_mode":%q,"user_id":%q,"location_id":%q,"extra_undocumented":{"score":%.2f}}}`,
		id, status, simModes[mrand.IntN(len(simModes))], randomID(10), randomID(10), mrand.Float64())
}

const idAlphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZabcdefghijkmnopqrstuvwxyz"

func randomID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = idAlphabet[int(b[i])%len(idAlphabet)]
	}
	return string(b)
}

// report prints a summary people can read.
func (s *simSummary) report(w io.Writer) {
	fmt.Fprintf(w, "events %d, sends %d (re-sends %d), requests %d (retries %d)\n",
		s.Events, s.Sends, s.Sends-s.Events, s.Requests, s.Requests-s.Sends)
	codes := make([]int, 0, len(s.Statuses))
	for c := range s.Statuses {
		codes = append(codes, c)
	}
	sort.Ints(codes)
	var parts []string
	for _, c := range codes {
		parts = append(parts, fmt.Sprintf("%d: %d", c, s.Statuses[c]))
	}
	fmt.Fprintf(w, "answers: %s; no answer: %d\n", strings.Join(parts, ", "), s.Errors)
	fmt.Fprintf(w, "accepted %d, duplicate %d, distinct event ids %d, gave up %d\n",
		s.Results["accepted"], s.Results["duplicate"], len(s.EventIDs), s.GaveUp)
	if len(s.Latencies) > 0 {
		l := slices.Clone(s.Latencies)
		slices.Sort(l)
		fmt.Fprintf(w, "latency p50 %s, p99 %s, max %s\n",
			l[len(l)/2].Round(time.Microsecond), l[len(l)*99/100].Round(time.Microsecond), l[len(l)-1].Round(time.Microsecond))
	}
	if s.FirstError != "" {
		fmt.Fprintf(w, "first error: %s\n", s.FirstError)
	}
}
