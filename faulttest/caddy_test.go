//go:build unix

package faulttest

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// caddyBin is the Caddy build under test, made once by TestMain; when the
// go command is missing, noGo says why every test skips.
var (
	caddyBin string
	noGo     string
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	goTool, err := exec.LookPath("go")
	if err != nil {
		noGo = "the go command is not on PATH, and these tests build cmd/caddy with it"
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "faulttest-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "faulttest: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "caddy")
	start := time.Now()
	// A plain build, even under -race: only the test process must be
	// race-clean, and a race build of Caddy would slow every test down.
	cmd := exec.Command(goTool, "build", "-o", bin, "github.com/webhook-relay/caddy-webhook-relay/cmd/caddy")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "faulttest: building cmd/caddy: %v\n", err)
		return 1
	}
	if testing.Verbose() {
		fmt.Printf("faulttest: built cmd/caddy in %s\n", time.Since(start).Round(time.Millisecond))
	}
	caddyBin = bin
	return m.Run()
}

// needCaddy skips the test when TestMain could not build Caddy for want of
// a go command.
func needCaddy(t *testing.T) {
	t.Helper()
	if caddyBin == "" {
		t.Skip(noGo)
	}
}

// The auth header every test's relay requires, and its value.
const (
	authHeader = "Okhi-Authorization"
	secret     = "fault-test-secret-8c1f"
)

// ports are one test's listening addresses, fixed and distinct per test so
// that a restarted Caddy comes back where its senders expect it.
type ports struct {
	relay, admin int
}

// freePorts picks two ports the kernel has free on 127.0.0.1, so that two
// runs of the suite on one machine do not collide. Caddy binds them a
// moment later; SO_REUSEADDR makes the reuse safe.
func freePorts(t *testing.T) ports {
	t.Helper()
	var got [2]int
	for i := range got {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		got[i] = l.Addr().(*net.TCPAddr).Port
		defer l.Close() // both held until both are picked: never the same port twice
	}
	return ports{relay: got[0], admin: got[1]}
}

func (p ports) relayURL() string { return fmt.Sprintf("http://127.0.0.1:%d/", p.relay) }

func (p ports) adminURL(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", p.admin, path)
}

// caddyfile is a whole config: global options that keep Caddy's own state
// in dir and off any public address, and one site on p.relay whose only
// handler is relay (a webhook_relay directive).
func caddyfile(p ports, dir, relay string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	auto_https off
	storage file_system %s
}

http://127.0.0.1:%d {
	bind 127.0.0.1
%s
}
`, p.admin, filepath.Join(dir, "caddy-data"), p.relay, relay)
}

// caddyProc is one Caddy subprocess, started again on the same config and
// ports after each kill. Its stdout and stderr go to one log file across
// starts.
type caddyProc struct {
	t       *testing.T
	ports   ports
	dir     string
	config  string
	logPath string
	starts  int

	restartTook, slowestRestart time.Duration // until ready again

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// startCaddy writes caddyfile to a temporary directory, starts Caddy on it
// and waits until both the admin endpoint and the relay answer.
func startCaddy(t *testing.T, p ports, caddyfile string) *caddyProc {
	t.Helper()
	c := launchCaddy(t, p, caddyfile)
	c.waitReady()
	return c
}

// launchCaddy starts Caddy without waiting for it to be ready, for a test
// that expects it to fail.
func launchCaddy(t *testing.T, p ports, caddyfile string) *caddyProc {
	t.Helper()
	needCaddy(t)
	dir := t.TempDir()
	c := &caddyProc{
		t:       t,
		ports:   p,
		dir:     dir,
		config:  filepath.Join(dir, "Caddyfile"),
		logPath: filepath.Join(dir, "caddy.log"),
	}
	if err := os.WriteFile(c.config, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.cleanup)
	c.launch()
	return c
}

func (c *caddyProc) launch() {
	t := c.t
	t.Helper()
	c.starts++
	logf, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "=== faulttest: start %d at %s\n", c.starts, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(caddyBin, "run", "--config", c.config, "--adapter", "caddyfile")
	cmd.Dir = c.dir
	cmd.Env = append(os.Environ(),
		"HOME="+c.dir,
		"XDG_DATA_HOME="+filepath.Join(c.dir, "xdg-data"),
		"XDG_CONFIG_HOME="+filepath.Join(c.dir, "xdg-config"),
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so that a signal reaches Caddy and nothing
	// of the test, and no child outlives the test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting caddy: %v", err)
	}
	c.cmd = cmd
	exited := make(chan struct{})
	c.exited = exited
	go func() {
		c.waitErr = cmd.Wait()
		close(exited)
	}()
}

// waitReady waits for the admin endpoint and for the relay's handler (a
// GET gets its 405), failing at once if Caddy exits.
func (c *caddyProc) waitReady() {
	t := c.t
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-c.exited:
			t.Fatalf("caddy exited while starting (%v); log:\n%s", c.waitErr, c.logTail(40))
		default:
		}
		if answers(client, c.ports.adminURL("/config/"), http.StatusOK) && answers(client, c.ports.relayURL(), http.StatusMethodNotAllowed) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy not ready after 20s; log:\n%s", c.logTail(40))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// answers reports whether a GET of url is answered with status.
func answers(client *http.Client, url string, status int) bool {
	resp, err := client.Get(url)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == status
}

// restart starts Caddy again on the same config, store and ports.
func (c *caddyProc) restart() {
	c.t.Helper()
	if c.running() {
		c.t.Fatal("restart of a running caddy")
	}
	start := time.Now()
	c.launch()
	c.waitReady()
	c.restartTook = time.Since(start)
	c.slowestRestart = max(c.slowestRestart, c.restartTook)
	if c.restartTook > time.Second {
		log := c.log()
		c.t.Logf("slow restart: ready %s after the start; its log:\n%s", c.restartTook.Round(time.Millisecond),
			log[strings.LastIndex(log, "=== faulttest: start"):])
	}
}

func (c *caddyProc) running() bool {
	select {
	case <-c.exited:
		return false
	default:
		return true
	}
}

// kill9 SIGKILLs Caddy's process group and waits for it to be gone.
func (c *caddyProc) kill9() {
	c.t.Helper()
	if err := syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		c.t.Fatalf("kill -9: %v", err)
	}
	c.waitExit(10 * time.Second)
}

// sigterm asks Caddy to stop and returns how long it took to exit, and how.
func (c *caddyProc) sigterm(timeout time.Duration) (time.Duration, error) {
	c.t.Helper()
	start := time.Now()
	if err := syscall.Kill(c.cmd.Process.Pid, syscall.SIGTERM); err != nil {
		c.t.Fatalf("kill -TERM: %v", err)
	}
	c.waitExit(timeout)
	return time.Since(start), c.waitErr
}

func (c *caddyProc) waitExit(timeout time.Duration) {
	c.t.Helper()
	select {
	case <-c.exited:
	case <-time.After(timeout):
		c.t.Fatalf("caddy still running %s after the signal; log:\n%s", timeout, c.logTail(40))
	}
}

func (c *caddyProc) cleanup() {
	if c.cmd == nil || !c.running() {
		return
	}
	_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	<-c.exited
}

func (c *caddyProc) log() string {
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return string(b)
}

func (c *caddyProc) logTail(n int) string {
	lines := strings.Split(strings.TrimRight(c.log(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var adminClient = &http.Client{Timeout: 10 * time.Second}

// load replaces the running config through the admin /load endpoint.
func (c *caddyProc) load(caddyfile string) (int, string, error) {
	req, err := http.NewRequest(http.MethodPost, c.ports.adminURL("/load"), strings.NewReader(caddyfile))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := adminClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// reloadCLI replaces the running config with `caddy reload`, the way an
// operator would.
func (c *caddyProc) reloadCLI(caddyfile string) error {
	path := filepath.Join(c.dir, "reload.caddyfile")
	if err := os.WriteFile(path, []byte(caddyfile), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(caddyBin, "reload", "--config", path, "--adapter", "caddyfile",
		"--address", fmt.Sprintf("127.0.0.1:%d", c.ports.admin))
	cmd.Env = append(os.Environ(), "HOME="+c.dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("caddy reload: %v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// overview is the admin GET /webhook_relay/ answer.
type overview struct {
	Relays []struct {
		Name          string `json:"name"`
		PendingEvents int64  `json:"pending_events"`
		Targets       []struct {
			Name        string `json:"name"`
			Configured  bool   `json:"configured"`
			Pending     int64  `json:"pending"`
			DeadLetters int64  `json:"dead_letters"`
			Held        bool   `json:"held"`
		} `json:"targets"`
	} `json:"relays"`
}

func (c *caddyProc) overview() (overview, error) {
	var o overview
	resp, err := adminClient.Get(c.ports.adminURL("/webhook_relay/"))
	if err != nil {
		return o, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return o, fmt.Errorf("GET /webhook_relay/: %s: %s", resp.Status, b)
	}
	return o, json.NewDecoder(resp.Body).Decode(&o)
}

// relayCounts are one relay's counts from the overview.
type relayCounts struct {
	pendingEvents int64
	pending, dead map[string]int64
	held          map[string]bool
}

func (c *caddyProc) counts(relay string) (relayCounts, error) {
	o, err := c.overview()
	if err != nil {
		return relayCounts{}, err
	}
	for _, r := range o.Relays {
		if r.Name != relay {
			continue
		}
		rc := relayCounts{pendingEvents: r.PendingEvents, pending: map[string]int64{}, dead: map[string]int64{}, held: map[string]bool{}}
		for _, tg := range r.Targets {
			rc.pending[tg.Name] = tg.Pending
			rc.dead[tg.Name] = tg.DeadLetters
			rc.held[tg.Name] = tg.Held
		}
		return rc, nil
	}
	return relayCounts{}, fmt.Errorf("no relay %q in the admin overview", relay)
}

// waitDrained polls the admin overview until relay owes nothing to any
// target, and returns its last counts.
func (c *caddyProc) waitDrained(relay string, timeout time.Duration) relayCounts {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	var last relayCounts
	var lastErr error
	for {
		rc, err := c.counts(relay)
		if err == nil {
			last = rc
			drained := rc.pendingEvents == 0
			for _, n := range rc.pending {
				drained = drained && n == 0
			}
			if drained {
				return rc
			}
		}
		lastErr = err
		if time.Now().After(deadline) {
			c.t.Fatalf("relay %s not drained after %s: pending_events %d, pending %v, dead %v (last error %v)",
				relay, timeout, last.pendingEvents, last.pending, last.dead, lastErr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// metric returns the value of the sample of name whose labels include
// every one of labels (`relay="x"`), from the admin /metrics; 0 if none.
func (c *caddyProc) metric(name string, labels ...string) (float64, error) {
	resp, err := adminClient.Get(c.ports.adminURL("/metrics"))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	return sample(string(b), name, labels...)
}

func sample(text, name string, labels ...string) (float64, error) {
	for line := range strings.SplitSeq(text, "\n") {
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		all := true
		for _, l := range labels {
			all = all && strings.Contains(line, l)
		}
		if !all {
			continue
		}
		v := line[strings.LastIndexByte(line, ' ')+1:]
		return strconv.ParseFloat(v, 64)
	}
	return 0, nil
}

// exitCode is the exit status in err from a finished process, -1 if it
// died of a signal or err is not an exit.
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}

// logSummary counts the lines of Caddy's log at warn level and above, by
// message.
func (c *caddyProc) logSummary() string {
	counts := map[string]int{}
	var order []string
	for line := range strings.SplitSeq(c.log(), "\n") {
		var entry struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &entry) != nil {
			continue
		}
		switch entry.Level {
		case "warn", "error", "panic", "fatal":
		default:
			continue
		}
		msg := entry.Level + ": " + entry.Msg
		if counts[msg] == 0 {
			order = append(order, msg)
		}
		counts[msg]++
	}
	if len(order) == 0 {
		return "no warnings or errors"
	}
	parts := make([]string, len(order))
	for i, msg := range order {
		parts[i] = fmt.Sprintf("%dx %q", counts[msg], msg)
	}
	return strings.Join(parts, "; ")
}
