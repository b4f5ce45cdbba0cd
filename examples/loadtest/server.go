package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Server variants.
const (
	kindRespond = "respond"
	kindProxy   = "reverse_proxy"
	kindBolt    = "relay-bolt"
	kindMemory  = "relay-memory"
	kindNATS    = "relay-nats"
	kindBoltJQ  = "relay-bolt-jq"
)

// allKinds is every variant -servers knows, and defaultKinds those a run
// without -servers takes, in the order a burst round runs them.
// relay-bolt-jq is left out of the default: its burst rounds and its own
// sustained search would add about a quarter to a run already minutes
// long, for a figure (what shaping costs) only issue 9 asks for.
var (
	allKinds     = []string{kindRespond, kindProxy, kindBolt, kindMemory, kindNATS, kindBoltJQ}
	defaultKinds = []string{kindRespond, kindProxy, kindBolt, kindMemory, kindNATS}
)

// The shaping relay-bolt-jq adds to relay-bolt's forward block: what a
// legacy service typically needs (CONTRACT.md, "Delivery shaped for
// legacy services"). The program picks fields of the generator's OkHi v2
// bodies (gen.go) into a flat object, which body_format form can encode;
// an event still in progress has no verification_status, so it gets one.
// The secret is a fixed one for the benchmark, printed in its header, not
// a credential; the target checks one signature a run with it.
const (
	shapingJQ = `{id: .v2.address_verification_id, status: (.v2.verification_status // "in_progress"), ` +
		`mode: .v2.verification_mode, location: .v2.location_id, user: .v2.user_id}`
	shapingSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
)

// shapingFields are the form keys shapingJQ makes, in the sorted order
// body_format form writes them.
var shapingFields = []string{"id", "location", "mode", "status", "user"}

// shapingLines are relay-bolt-jq's extra forward subdirectives, indented
// for its forward block. The program is one Caddyfile token in backticks.
func shapingLines() string {
	return "\t\t\ttransform jq `" + shapingJQ + "`\n" +
		"\t\t\tbody_format form\n" +
		"\t\t\tsign standard_webhooks " + shapingSecret + "\n"
}

// buildCaddy builds cmd/caddy of the module that holds the working
// directory into dir.
func buildCaddy(ctx context.Context, dir string) (string, error) {
	return goBuild(ctx, filepath.Join(dir, "caddy"), "./cmd/caddy")
}

// goBuild builds pkg, as the module that holds the working directory
// requires it, into bin.
func goBuild(ctx context.Context, bin, pkg string) (string, error) {
	gomod := strings.TrimSpace(cmdOutput("go", "env", "GOMOD"))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("run from inside the caddy-webhook-relay module (go env GOMOD is empty)")
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, pkg)
	cmd.Dir = filepath.Dir(gomod)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build %s: %w", pkg, err)
	}
	return bin, nil
}

// freePort asks the kernel for a free port on 127.0.0.1.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// serverConf is one variant with its ports and storage.
type serverConf struct {
	kind        string
	dir         string // holds the Caddyfile, the log, Caddy's data dir and the store
	port, admin int
	targetURL   string
	concurrency int
	launches    int
	// natsPort and natsMonitor are relay-nats's nats-server's client and
	// monitoring ports.
	natsPort, natsMonitor int
}

func (c *serverConf) addr() string      { return "127.0.0.1:" + strconv.Itoa(c.port) }
func (c *serverConf) storeDir() string  { return filepath.Join(c.dir, "store") }
func (c *serverConf) caddyfile() string { return filepath.Join(c.dir, "Caddyfile") }

func (c *serverConf) render() string {
	var site string
	switch c.kind {
	case kindRespond:
		site = "\trespond 200\n"
	case kindProxy:
		u := strings.TrimPrefix(c.targetURL, "http://")
		host, _, _ := strings.Cut(u, "/")
		site = "\treverse_proxy " + host + "\n"
	case kindBolt, kindMemory, kindNATS, kindBoltJQ:
		storage := c.storeDir()
		switch c.kind {
		case kindMemory:
			storage = "memory"
		case kindNATS:
			// The defaults otherwise: stream WEBHOOK_RELAY_BENCH, one
			// replica, intake waits up to 2 s for JetStream's ack.
			storage = "nats nats://127.0.0.1:" + strconv.Itoa(c.natsPort)
		}
		var shaping string
		if c.kind == kindBoltJQ {
			shaping = shapingLines() // relay-bolt's settings otherwise
		}
		// max_pending above the default of 1,000,000, so that the relay
		// restarted with -restart-pending 1000000 can take new events.
		site = fmt.Sprintf(`	webhook_relay bench {
		auth_header %s %s
		storage %s
		max_pending 10000000
		forward legacy %s {
			concurrency %d
			backoff 100ms 2s
			max_attempts 1000
			timeout 5s
%s		}
	}
`, strings.ToLower(authHeader), authValue, storage, c.targetURL, c.concurrency, shaping)
	}
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	grace_period 5s
}

http://:%d {
	bind 127.0.0.1
%s}
`, c.admin, c.port, site)
}

// server is one running Caddy process.
type server struct {
	conf    *serverConf
	bin     string
	pin     bool
	cmd     *exec.Cmd
	done    chan struct{}
	err     error
	log     *os.File
	logPath string // one log per process, beside the Caddyfile
	started time.Time
	// nats is relay-nats's nats-server, stopped after Caddy.
	nats *natsServer
	// anonKB is the highest RssAnon seen by watchAnon.
	anonKB atomic.Int64
}

// adminURL is path on the server's admin endpoint.
func (c *serverConf) adminURL(path string) string {
	return "http://127.0.0.1:" + strconv.Itoa(c.admin) + path
}

// newServerConf prepares a fresh directory and ports for a variant.
func newServerConf(base, kind, targetURL string, concurrency int) (*serverConf, error) {
	dir, err := os.MkdirTemp(base, kind+"-")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	admin, err := freePort()
	if err != nil {
		return nil, err
	}
	c := &serverConf{kind: kind, dir: dir, port: port, admin: admin, targetURL: targetURL, concurrency: concurrency}
	if kind == kindNATS {
		if c.natsPort, err = freePort(); err != nil {
			return nil, err
		}
		if c.natsMonitor, err = freePort(); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(c.storeDir(), 0o700); err != nil {
		return nil, err
	}
	return c, os.WriteFile(c.caddyfile(), []byte(c.render()), 0o600)
}

// launch starts Caddy on conf without waiting for it to serve.
func launch(bin string, conf *serverConf, pin bool) (*server, error) {
	conf.launches++
	logPath := filepath.Join(conf.dir, fmt.Sprintf("caddy-%d.log", conf.launches))
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	args := []string{bin, "run", "--config", conf.caddyfile(), "--adapter", "caddyfile"}
	if pin {
		args = append([]string{"taskset", "-c", "0"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = conf.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(),
		"XDG_DATA_HOME="+filepath.Join(conf.dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(conf.dir, "config"),
	)
	// Own process group, so a Ctrl-C reaches only us and we stop Caddy in
	// order; killed with us if we die without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	s := &server{conf: conf, bin: bin, pin: pin, cmd: cmd, done: make(chan struct{}), log: logf, logPath: logPath}
	s.started = time.Now()
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting %s: %w", conf.kind, err)
	}
	go func() {
		s.err = cmd.Wait()
		close(s.done)
	}()
	go s.watchAnon()
	return s, nil
}

// anonEvery is how often watchAnon reads the server's anonymous memory.
const anonEvery = 100 * time.Millisecond

// watchAnon samples the server's RssAnon until it exits. VmHWM counts
// file pages too, and a relay maps its binary and its bbolt file: after a
// long burst most of its peak is the file, which the kernel may drop at
// will. The heap and stacks are the anonymous part.
func (s *server) watchAnon() {
	t := time.NewTicker(anonEvery)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
			if kb := procStatusKB(s.pid(), "RssAnon"); kb > s.anonKB.Load() {
				s.anonKB.Store(kb)
			}
		}
	}
}

// peakAnon is the highest anonymous resident memory sampled so far, in MB.
func (s *server) peakAnon() float64 {
	return float64(s.anonKB.Load()) / 1024
}

// start launches Caddy and waits until it answers HTTP on its port.
func start(ctx context.Context, bin string, conf *serverConf, pin bool) (*server, error) {
	s, err := launch(bin, conf, pin)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if s.exited() {
			return nil, fmt.Errorf("%s exited at start (%v); log:\n%s", conf.kind, s.err, s.logTail(20))
		}
		if answersHTTP(conf.addr()) {
			return s, nil
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("%s did not answer on %s within 30s; log:\n%s", conf.kind, conf.addr(), s.logTail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// answersHTTP reports whether anything answers a GET on addr (the relay
// answers 405, which is as good as 200 here).
func answersHTTP(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("GET /okhi HTTP/1.1\r\nHost: " + addr + "\r\nConnection: close\r\n\r\n")); err != nil {
		return false
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return true
}

func (s *server) pid() int { return s.cmd.Process.Pid }

func (s *server) exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// cpu is the server side's on-CPU time so far: Caddy's, plus its
// nats-server's for relay-nats, since both share the server core and
// relay-bolt's Caddy does that work (the store's writes and fsyncs)
// itself.
func (s *server) cpu() time.Duration {
	d, _ := procCPU(s.pid())
	return d + s.nats.cpu()
}

// peakRSS is the server's peak resident set so far, in MB.
func (s *server) peakRSS() float64 {
	return float64(procStatusKB(s.pid(), "VmHWM")) / 1024
}

// stop sends SIGTERM, kills after 15 s, and returns how long Caddy's exit
// took; then it stops the nats-server, if any.
func (s *server) stop() time.Duration {
	if s == nil {
		return 0
	}
	t0 := time.Now()
	if !s.exited() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(15 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.done
		}
	}
	_ = s.log.Close()
	d := time.Since(t0)
	s.nats.stop()
	return d
}

// logTail returns the last n lines Caddy wrote.
func (s *server) logTail(n int) string { return fileTail(s.logPath, n) }

// fileTail returns the last n lines of the file at path.
func fileTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// eachLine calls fn with every line of the file at path (none if it
// cannot be read).
func eachLine(path string, fn func(line []byte)) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fn(sc.Bytes())
	}
}

// logProblems counts log lines at warn level or worse, by message.
func (s *server) logProblems() map[string]int {
	out := map[string]int{}
	eachLine(s.logPath, func(line []byte) {
		var l struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal(line, &l) != nil {
			return
		}
		switch l.Level {
		case "warn", "error", "panic", "fatal":
			out[l.Level+": "+l.Msg]++
		}
	})
	return out
}

// waitStoreUp waits until the admin API says every relay's store takes
// writes: Caddy answers HTTP before the relay has connected to NATS and
// set up its stream, and a burst begun then would start with 503s.
func (s *server) waitStoreUp(ctx context.Context, timeout time.Duration) error {
	c := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		resp, err := c.Get(s.conf.adminURL("/webhook_relay/"))
		if err == nil {
			var v struct {
				Relays []struct {
					StoreUp    bool   `json:"store_up"`
					StoreError string `json:"store_error"`
				} `json:"relays"`
			}
			err = json.NewDecoder(resp.Body).Decode(&v)
			_ = resp.Body.Close()
			if err == nil {
				up := len(v.Relays) > 0
				for _, r := range v.Relays {
					if !r.StoreUp {
						up, last = false, "store down: "+r.StoreError
					}
				}
				if up {
					return nil
				}
			}
		}
		if err != nil {
			last = err.Error()
		}
		if s.exited() || ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("%s: store not up within %s (%s); log:\n%s", s.conf.kind, timeout, last, s.logTail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pending asks the admin API how many events the relay still owes.
func (s *server) pending() (int64, error) {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(s.conf.adminURL("/webhook_relay/"))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var v struct {
		Relays []struct {
			PendingEvents int64 `json:"pending_events"`
		} `json:"relays"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return 0, err
	}
	var n int64
	for _, r := range v.Relays {
		n += r.PendingEvents
	}
	return n, nil
}

// profile saves Caddy's CPU profile over the next d, then its allocation
// profile, from the admin endpoint into dir as <prefix>.cpu.pprof and
// <prefix>.allocs.pprof; done is closed when both are written.
func (s *server) profile(dir, prefix string, d time.Duration) (done chan struct{}) {
	sec := strconv.Itoa(max(1, int(d.Seconds())))
	return s.fetchProfiles(dir, d, []struct{ path, file string }{
		{"profile?seconds=" + sec, prefix + ".cpu.pprof"},
		{"allocs", prefix + ".allocs.pprof"},
	})
}

// trace saves an execution trace of Caddy over the next d into dir
// (go tool trace <file>; -pprof=sched and -pprof=syscall say what the
// slowest acks waited for).
func (s *server) trace(dir, prefix string, d time.Duration) (done chan struct{}) {
	sec := strconv.Itoa(max(1, int(d.Seconds())))
	return s.fetchProfiles(dir, d, []struct{ path, file string }{{"trace?seconds=" + sec, prefix + ".trace"}})
}

// fetchProfiles fetches each of Caddy's /debug/pprof/ paths into its file
// in dir, one after the other, the first taking d.
func (s *server) fetchProfiles(dir string, d time.Duration, paths []struct{ path, file string }) (done chan struct{}) {
	done = make(chan struct{})
	base := s.conf.adminURL("/debug/pprof/")
	go func() {
		defer close(done)
		c := &http.Client{Timeout: d + 15*time.Second}
		for _, p := range paths {
			if err := fetchTo(c, base+p.path, filepath.Join(dir, p.file)); err != nil {
				progress("  profile %s: %v", p.file, err)
			}
		}
	}()
	return done
}

func fetchTo(c *http.Client, url, path string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// ackP99 reads the relay's own ack_duration_seconds histogram from Caddy's
// metrics and returns the upper bound of the bucket holding its 99th
// percentile: the time inside Caddy, without the network and the load
// generator's scheduling.
func (s *server) ackP99() (time.Duration, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(s.conf.adminURL("/metrics"))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return 0, err
	}
	f := families["caddy_webhook_relay_ack_duration_seconds"]
	if f == nil {
		return 0, fmt.Errorf("no ack_duration_seconds in Caddy's metrics")
	}
	// Every relay's histogram has the same buckets: add them up.
	var total uint64
	cumulative := map[float64]uint64{}
	for _, m := range f.GetMetric() {
		h := m.GetHistogram()
		total += h.GetSampleCount()
		for _, b := range h.GetBucket() {
			cumulative[b.GetUpperBound()] += b.GetCumulativeCount()
		}
	}
	if total == 0 {
		return 0, fmt.Errorf("no acks in the histogram")
	}
	bounds := slices.Sorted(maps.Keys(cumulative))
	for _, le := range bounds {
		if float64(cumulative[le]) >= 0.99*float64(total) {
			return time.Duration(le * float64(time.Second)), nil
		}
	}
	return 0, fmt.Errorf("99th percentile above the last bucket")
}
