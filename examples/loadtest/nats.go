package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// buildNATS builds nats-server at the version in go.mod into dir.
func buildNATS(ctx context.Context, dir string) (string, error) {
	return goBuild(ctx, filepath.Join(dir, "nats-server"), "github.com/nats-io/nats-server/v2")
}

// natsConfig is a one-node JetStream on loopback that fsyncs every write
// before acknowledging it, so that relay-nats acks are as durable as
// relay-bolt's: the default sync_interval (2 minutes) would measure a
// store that loses acknowledged events when the machine crashes.
func natsConfig(storeDir string, port, monitor int) string {
	return fmt.Sprintf(`server_name: loadtest
listen: 127.0.0.1:%d
http: 127.0.0.1:%d

jetstream {
	store_dir: %s
	sync_interval: always
	max_memory_store: 64MB
	max_file_store: 20GB
}
`, port, monitor, strconv.Quote(storeDir))
}

// natsServer is the nats-server process behind one relay-nats run. Every
// run gets its own, on a fresh store dir, so every run starts with a
// fresh stream and no ids in its duplicate window.
type natsServer struct {
	dir           string
	port, monitor int
	cmd           *exec.Cmd
	done          chan struct{}
	err           error
	log           *os.File
	logPath       string
}

func (n *natsServer) url() string { return "nats://127.0.0.1:" + strconv.Itoa(n.port) }

// startNATS writes the config into dir, starts nats-server on it (pinned
// like Caddy, to the server core) and waits until its monitor says
// JetStream is healthy.
func startNATS(ctx context.Context, bin, dir, storeDir string, port, monitor int, pin bool) (*natsServer, error) {
	conf := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(conf, []byte(natsConfig(storeDir, port, monitor)), 0o600); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "nats-server.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	args := []string{bin, "-c", conf}
	if pin {
		args = append([]string{"taskset", "-c", "0"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// As for Caddy: a Ctrl-C reaches only us, and we stop it in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	n := &natsServer{dir: dir, port: port, monitor: monitor, cmd: cmd, done: make(chan struct{}), log: logf, logPath: logPath}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting nats-server: %w", err)
	}
	go func() {
		n.err = cmd.Wait()
		close(n.done)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for !n.healthy() {
		if n.exited() {
			_ = n.log.Close()
			return nil, fmt.Errorf("nats-server exited at start (%v); log:\n%s", n.err, n.logTail(20))
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			n.stop()
			return nil, fmt.Errorf("nats-server not healthy on 127.0.0.1:%d within 30s; log:\n%s", monitor, n.logTail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return n, nil
}

// healthy: /healthz answers 200 only once JetStream is up.
func (n *natsServer) healthy() bool {
	c := &http.Client{Timeout: time.Second}
	resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(n.monitor) + "/healthz")
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// jetStreamConfig is what the running server says it fsyncs, from /varz:
// the check that the config took.
func (n *natsServer) jetStreamConfig() (syncAlways bool, storeDir string, err error) {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(n.monitor) + "/varz")
	if err != nil {
		return false, "", err
	}
	defer resp.Body.Close()
	var v struct {
		JetStream struct {
			Config struct {
				StoreDir   string `json:"store_dir"`
				SyncAlways bool   `json:"sync_always"`
			} `json:"config"`
		} `json:"jetstream"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return false, "", fmt.Errorf("decoding /varz: %w", err)
	}
	return v.JetStream.Config.SyncAlways, v.JetStream.Config.StoreDir, nil
}

func (n *natsServer) pid() int { return n.cmd.Process.Pid }

func (n *natsServer) exited() bool {
	select {
	case <-n.done:
		return true
	default:
		return false
	}
}

// cpu is nats-server's on-CPU time so far; 0 for none.
func (n *natsServer) cpu() time.Duration {
	if n == nil {
		return 0
	}
	d, _ := procCPU(n.pid())
	return d
}

// peakRSS is nats-server's peak resident set so far, in MB.
func (n *natsServer) peakRSS() float64 {
	return float64(procStatusKB(n.pid(), "VmHWM")) / 1024
}

// stop sends SIGTERM and kills after 15 s.
func (n *natsServer) stop() {
	if n == nil {
		return
	}
	if !n.exited() {
		_ = n.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-n.done:
		case <-time.After(15 * time.Second):
			_ = n.cmd.Process.Kill()
			<-n.done
		}
	}
	_ = n.log.Close()
}

func (n *natsServer) logTail(k int) string { return fileTail(n.logPath, k) }

// logProblems counts nats-server's warning and error lines
// ("[pid] date time [WRN] message"), by message.
func (n *natsServer) logProblems() map[string]int {
	out := map[string]int{}
	eachLine(n.logPath, func(b []byte) {
		line := string(b)
		for _, lvl := range []string{"[WRN] ", "[ERR] ", "[FTL] "} {
			// A failed health check is startNATS polling /healthz
			// before the server is ready, not a problem of the run.
			if _, msg, ok := strings.Cut(line, lvl); ok && !strings.HasPrefix(msg, "Healthcheck failed") {
				out[strings.Trim(lvl, "[] ")+": "+msg]++
			}
		}
	})
	return out
}
