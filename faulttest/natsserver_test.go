//go:build unix

package faulttest

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// natsBuild is the nats-server binary of the NATS tests, built on first
// use (at the version go.mod pins, from the module cache) so that a run
// of the other tests does not pay for it. It goes beside caddyBin, whose
// directory TestMain removes.
var natsBuild struct {
	once sync.Once
	bin  string
	took time.Duration
	err  error
}

// needNATS returns the nats-server binary, building it once per run.
func needNATS(t *testing.T) string {
	t.Helper()
	needCaddy(t)
	natsBuild.once.Do(func() {
		bin := filepath.Join(filepath.Dir(caddyBin), "nats-server")
		start := time.Now()
		// Not a race build, like Caddy's: only the test process must be
		// race-clean.
		cmd := exec.Command("go", "build", "-o", bin, "github.com/nats-io/nats-server/v2")
		out, err := cmd.CombinedOutput()
		if err != nil {
			natsBuild.err = fmt.Errorf("building nats-server: %w: %s", err, strings.TrimSpace(string(out)))
			return
		}
		natsBuild.bin, natsBuild.took = bin, time.Since(start)
		t.Logf("built nats-server in %s", natsBuild.took.Round(time.Millisecond))
	})
	if natsBuild.err != nil {
		t.Fatal(natsBuild.err)
	}
	return natsBuild.bin
}

// freePortList picks n distinct ports the kernel has free on 127.0.0.1,
// all held until all are picked.
func freePortList(t *testing.T, n int) []int {
	t.Helper()
	got := make([]int, n)
	for i := range got {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		got[i] = l.Addr().(*net.TCPAddr).Port
		defer l.Close()
	}
	return got
}

// natsProc is one nats-server subprocess with JetStream on a store
// directory of the test, started again on the same directory and ports
// after each stop. Its output goes to one log file across starts.
type natsProc struct {
	t             *testing.T
	bin           string
	port, monitor int
	dir, storeDir string
	config        string
	logPath       string
	starts        int

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// startNATS writes a config (JetStream, fsync before every ack, client
// and monitoring ports on loopback) and starts nats-server on it, waiting
// until JetStream is enabled.
func startNATS(t *testing.T) *natsProc {
	t.Helper()
	bin := needNATS(t)
	ports := freePortList(t, 2)
	dir := t.TempDir()
	n := &natsProc{
		t: t, bin: bin, port: ports[0], monitor: ports[1],
		dir: dir, storeDir: filepath.Join(dir, "jetstream"),
		config: filepath.Join(dir, "nats.conf"), logPath: filepath.Join(dir, "nats.log"),
	}
	// sync_interval always, as the README asks of a single node: with one
	// replica the relay's 200 is only as durable as this fsync.
	conf := fmt.Sprintf(`server_name: faulttest
listen: 127.0.0.1:%d
http: 127.0.0.1:%d
jetstream {
	store_dir: %q
	sync_interval: always
	max_memory_store: 64MB
	max_file_store: 1GB
}
`, n.port, n.monitor, n.storeDir)
	if err := os.WriteFile(n.config, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.cleanup)
	n.launch()
	n.waitHealthy(30 * time.Second)
	return n
}

func (n *natsProc) url() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.port) }

func (n *natsProc) launch() {
	t := n.t
	t.Helper()
	n.starts++
	logf, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "=== faulttest: start %d at %s\n", n.starts, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(n.bin, "-c", n.config)
	cmd.Dir = n.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting nats-server: %v", err)
	}
	n.cmd = cmd
	exited := make(chan struct{})
	n.exited = exited
	go func() {
		n.waitErr = cmd.Wait()
		close(exited)
	}()
}

// waitHealthy waits for the monitoring /healthz to say JetStream is
// enabled, failing at once if the server exits.
func (n *natsProc) waitHealthy(timeout time.Duration) {
	t := n.t
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz?js-enabled-only=true", n.monitor)
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-n.exited:
			t.Fatalf("nats-server exited while starting (%v); log:\n%s", n.waitErr, n.logTail(30))
		default:
		}
		if answers(client, url, http.StatusOK) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server not healthy after %s; log:\n%s", timeout, n.logTail(30))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (n *natsProc) running() bool {
	select {
	case <-n.exited:
		return false
	default:
		return true
	}
}

// restart starts nats-server again on the same config, store and ports
// and returns when JetStream is enabled.
func (n *natsProc) restart() {
	n.t.Helper()
	if n.running() {
		n.t.Fatal("restart of a running nats-server")
	}
	n.launch()
	n.waitHealthy(30 * time.Second)
}

// stop SIGTERMs nats-server (its clean shutdown) and waits for it to exit.
func (n *natsProc) stop() {
	n.t.Helper()
	if err := syscall.Kill(n.cmd.Process.Pid, syscall.SIGTERM); err != nil {
		n.t.Fatalf("kill -TERM nats-server: %v", err)
	}
	n.waitExit(20 * time.Second)
}

// kill9 SIGKILLs nats-server and waits for it to be gone.
func (n *natsProc) kill9() {
	n.t.Helper()
	if err := syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		n.t.Fatalf("kill -9 nats-server: %v", err)
	}
	n.waitExit(10 * time.Second)
}

func (n *natsProc) waitExit(timeout time.Duration) {
	n.t.Helper()
	select {
	case <-n.exited:
	case <-time.After(timeout):
		n.t.Fatalf("nats-server still running %s after the signal; log:\n%s", timeout, n.logTail(30))
	}
}

// cleanup stops a server still running the way an operator would, and
// SIGKILLs it if that takes too long. It runs after the Caddy cleanups
// (registered later), so Caddy never sees NATS go first.
func (n *natsProc) cleanup() {
	if n.cmd == nil || !n.running() {
		return
	}
	_ = syscall.Kill(n.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-n.exited
	}
}

func (n *natsProc) logTail(lines int) string {
	b, err := os.ReadFile(n.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// natsRelay is a webhook_relay block on NATS: every instance of one relay
// passes the same name, server and stream. extra goes inside the forward
// block (an instance's own header, say).
func natsRelay(name, stream string, n *natsProc, tg, url, extra string) string {
	return fmt.Sprintf(`	webhook_relay %s {
		auth_header %s %s
		storage nats %s {
			stream %s
			timeout 2s
		}
		forward %s %s {
			timeout 2s
			backoff 20ms 300ms
			max_attempts 100000%s
		}
	}`, name, authHeader, secret, n.url(), stream, tg, url, extra)
}
