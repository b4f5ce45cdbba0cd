package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/bits"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// authHeader and authValue are what the relay variants are configured to
// require; respond and reverse_proxy ignore them.
const (
	authHeader = "Okhi-Authorization"
	authValue  = "s3cret"
	idLen      = 16 // hex digits of an event's address_verification_id
)

// nextID hands out event ids for the whole process, so every event sent to
// one store is new unless it is meant as a re-send.
var nextID atomic.Uint64

// variants are the OkHi v2 shapes the generator cycles through; the one an
// event uses is a function of its id, so a re-send of an id is byte for byte
// the earlier request.
var variants = []struct{ status, mode string }{
	{"verified", "first_time"},
	{"not_at_address", "first_time"},
	{"", "first_time"}, // in progress: no status field
	{"verified", "continuous"},
	{"unknown", "continuous"},
}

// template is a pre-rendered HTTP/1.1 request whose id digits are patched
// in place before each write.
type template struct {
	req   []byte
	idOff int
}

func renderTemplates(host string) []template {
	out := make([]template, len(variants))
	zeros := string(bytes.Repeat([]byte{'0'}, idLen))
	for i, v := range variants {
		var body bytes.Buffer
		body.WriteString(`{"v2":{"address_verification_id":"`)
		idOff := body.Len()
		body.WriteString(zeros)
		body.WriteString(`"`)
		if v.status != "" {
			body.WriteString(`,"verification_status":"` + v.status + `"`)
		}
		body.WriteString(`,"verification_mode":"` + v.mode + `","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn",` +
			`"extra_undocumented":{"score":0.91,"source":"loadtest","signals":["gps","wifi"]}}}`)
		head := "POST /okhi HTTP/1.1\r\n" +
			"Host: " + host + "\r\n" +
			"User-Agent: okhi-webhook-loadtest\r\n" +
			"Content-Type: application/json\r\n" +
			authHeader + ": " + authValue + "\r\n" +
			"Content-Length: " + strconv.Itoa(body.Len()) + "\r\n\r\n"
		out[i] = template{req: append([]byte(head), body.Bytes()...), idOff: len(head) + idOff}
	}
	return out
}

const hexDigits = "0123456789abcdef"

// request returns the request bytes for event id, rendered into the
// connection's own copy of the templates.
func request(tpls []template, id uint64) []byte {
	t := &tpls[id%uint64(len(tpls))]
	b := t.req[t.idOff : t.idOff+idLen]
	for i := idLen - 1; i >= 0; i-- {
		b[i] = hexDigits[id&0xf]
		id >>= 4
	}
	return t.req
}

// loadSpec is one run of the generator.
type loadSpec struct {
	addr     string
	conns    int
	duration time.Duration // closed loop: stop sending after it; open loop: schedule length
	rate     float64       // requests/s over all connections; 0 = closed loop
	count    int64         // total requests; 0 = bounded by duration only
	resend   float64       // fraction of requests that re-send an earlier body exactly
	maxTime  time.Duration // hard bound for count-limited runs
}

// loadResult is what one run measured.
type loadResult struct {
	responses  int64
	status     [600]int64
	accepted   int64 // relay answered {"status":"accepted"}
	duplicate  int64 // relay answered {"status":"duplicate"}
	connErrors int64
	late       int64 // open loop: requests sent more than 1 ms after their slot
	unsent     int64 // open loop: slots still unsent when the schedule ended
	hist       histogram
	elapsed    time.Duration
	selfCPU    time.Duration // this process (generator and target) on-CPU time
	cores      []coreLoad    // how busy each core was during the run
	firstErr   string
}

func (r *loadResult) ok() int64 { return r.status[200] }

func (r *loadResult) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.ok()) / r.elapsed.Seconds()
}

func (r *loadResult) merge(o *loadResult) {
	r.responses += o.responses
	for i, n := range o.status {
		r.status[i] += n
	}
	r.accepted += o.accepted
	r.duplicate += o.duplicate
	r.connErrors += o.connErrors
	r.late += o.late
	r.unsent += o.unsent
	r.hist.merge(&o.hist)
	if r.firstErr == "" {
		r.firstErr = o.firstErr
	}
}

// non200 renders the answers other than 200, e.g. "503×12 401×1".
func (r *loadResult) non200() string {
	var b bytes.Buffer
	for code, n := range r.status {
		if code != 200 && n > 0 {
			fmt.Fprintf(&b, "%d×%d ", code, n)
		}
	}
	return string(bytes.TrimSpace(b.Bytes()))
}

// runLoad drives spec.conns keep-alive connections, each sending the next
// request once the previous answer is read (closed loop) or at its slots of
// a fixed schedule (open loop).
func runLoad(ctx context.Context, spec loadSpec) *loadResult {
	if spec.conns < 1 {
		spec.conns = 1
	}
	maxTime := spec.maxTime
	if maxTime == 0 {
		maxTime = spec.duration
	}
	var budget atomic.Int64
	budget.Store(spec.count)
	results := make([]*loadResult, spec.conns)
	cpu0 := selfCPU()
	cores0 := readCores()
	start := time.Now()
	stopAt := start.Add(maxTime)
	if spec.count == 0 {
		stopAt = start.Add(spec.duration)
	}
	var wg sync.WaitGroup
	for i := range spec.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := &worker{spec: spec, idx: i, start: start, stopAt: stopAt, budget: &budget}
			if spec.count == 0 {
				w.budget = nil
			}
			results[i] = w.run(ctx)
		}()
	}
	wg.Wait()
	total := &loadResult{}
	for _, r := range results {
		total.merge(r)
	}
	total.elapsed = time.Since(start)
	total.selfCPU = selfCPU() - cpu0
	total.cores = coreBusy(cores0, readCores())
	return total
}

type worker struct {
	spec   loadSpec
	idx    int
	start  time.Time
	stopAt time.Time
	budget *atomic.Int64

	tpls   []template
	conn   net.Conn
	br     *bufio.Reader
	body   bytes.Buffer
	recent [1024]uint64
	nsent  int
	ids    [2]uint64 // next id, end of the reserved block
	rng    *rand.Rand
	res    loadResult
}

func (w *worker) run(ctx context.Context) *loadResult {
	w.tpls = renderTemplates(w.spec.addr)
	w.rng = rand.New(rand.NewPCG(uint64(w.idx)+1, uint64(w.start.UnixNano())))
	defer func() {
		if w.conn != nil {
			_ = w.conn.Close()
		}
	}()
	var interval time.Duration
	next := w.start
	if w.spec.rate > 0 {
		interval = time.Duration(float64(w.spec.conns) / w.spec.rate * float64(time.Second))
		next = w.start.Add(interval * time.Duration(w.idx) / time.Duration(w.spec.conns))
	}
	fails := 0
	for ctx.Err() == nil {
		now := time.Now()
		if interval > 0 {
			if !next.Before(w.stopAt) {
				break
			}
			if !now.Before(w.stopAt) {
				// Behind schedule at the end: the slots left were not
				// served at the rate asked for; count them, do not send.
				w.res.unsent += int64(w.stopAt.Sub(next)/interval) + 1
				break
			}
			if d := next.Sub(now); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-ctx.Done():
					t.Stop()
					return &w.res
				case <-t.C:
				}
			} else if -d > time.Millisecond {
				w.res.late++
			}
			next = next.Add(interval)
		} else if !now.Before(w.stopAt) {
			break
		}
		if w.budget != nil && w.budget.Add(-1) < 0 {
			break
		}
		if err := w.once(); err != nil {
			w.res.connErrors++
			if w.res.firstErr == "" {
				w.res.firstErr = err.Error()
			}
			if w.conn != nil {
				_ = w.conn.Close()
				w.conn = nil
			}
			fails++
			if fails > 50 {
				break // the server is gone; the caller reports it
			}
			time.Sleep(20 * time.Millisecond)
			continue
		}
		fails = 0
	}
	return &w.res
}

// id picks the next event: a new one, or with probability resend an exact
// re-send of one this connection sent before.
func (w *worker) id() uint64 {
	if w.nsent > 0 && w.spec.resend > 0 && w.rng.Float64() < w.spec.resend {
		n := min(w.nsent, len(w.recent))
		return w.recent[w.rng.IntN(n)]
	}
	if w.ids[0] == w.ids[1] {
		const block = 256
		end := nextID.Add(block)
		w.ids = [2]uint64{end - block, end}
	}
	id := w.ids[0]
	w.ids[0]++
	w.recent[w.nsent%len(w.recent)] = id
	w.nsent++
	return id
}

var (
	accepted  = []byte(`"accepted"`)
	duplicate = []byte(`"duplicate"`)
)

func (w *worker) once() error {
	if w.conn == nil {
		c, err := net.DialTimeout("tcp", w.spec.addr, 5*time.Second)
		if err != nil {
			return err
		}
		// One deadline for the whole run bounds every read and write
		// without a timer per request.
		_ = c.SetDeadline(w.stopAt.Add(30 * time.Second))
		w.conn = c
		if w.br == nil {
			w.br = bufio.NewReaderSize(c, 4096)
		} else {
			w.br.Reset(c)
		}
	}
	req := request(w.tpls, w.id())
	t0 := time.Now()
	if _, err := w.conn.Write(req); err != nil {
		return err
	}
	resp, err := http.ReadResponse(w.br, nil)
	if err != nil {
		return err
	}
	w.body.Reset()
	_, err = w.body.ReadFrom(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return err
	}
	w.res.hist.record(time.Since(t0))
	w.res.responses++
	if resp.StatusCode >= 0 && resp.StatusCode < len(w.res.status) {
		w.res.status[resp.StatusCode]++
	}
	if resp.StatusCode == http.StatusOK {
		b := w.body.Bytes()
		if bytes.Contains(b, accepted) {
			w.res.accepted++
		} else if bytes.Contains(b, duplicate) {
			w.res.duplicate++
		}
	}
	if resp.Close {
		_ = w.conn.Close()
		w.conn = nil
	}
	return nil
}

// probe sends one new event on a fresh connection and returns the status,
// or an error when nothing answered.
func probe(addr string, timeout time.Duration) (int, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	tpls := renderTemplates(addr)
	if _, err := c.Write(request(tpls, nextID.Add(1))); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode, nil
}

// histogram is a log-linear latency histogram in nanoseconds: exact below
// 128 ns, then 64 buckets per power of two (about 1.6% resolution).
type histogram struct {
	counts [64 + 40*64]uint64
	n      uint64
	max    time.Duration
}

func bucketOf(v uint64) int {
	if v < 128 {
		return int(v)
	}
	e := bits.Len64(v) - 7 // v>>e is in [64, 128)
	i := 64 + e*64 + int(v>>e) - 64
	return min(i, len(histogram{}.counts)-1)
}

// bucketValue is the upper bound of bucket i.
func bucketValue(i int) time.Duration {
	if i < 128 {
		return time.Duration(i)
	}
	e := (i - 64) / 64
	m := uint64((i-64)%64 + 64)
	return time.Duration((m+1)<<e - 1)
}

func (h *histogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[bucketOf(uint64(d))]++
	h.n++
	if d > h.max {
		h.max = d
	}
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n-1)) + 1
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(bucketValue(i), h.max)
		}
	}
	return h.max
}
