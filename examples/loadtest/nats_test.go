package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestNATSServer starts the nats-server relay-nats runs on, as a real
// process, and checks that it took the config: JetStream on the run's
// store dir, fsync before every acknowledgement, loopback only.
func TestNATSServer(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts nats-server")
	}
	ctx := context.Background()
	bin, err := buildNATS(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	monitor, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	n, err := startNATS(ctx, bin, dir, store, port, monitor, false)
	if err != nil {
		t.Fatal(err)
	}
	defer n.stop()

	always, got, err := n.jetStreamConfig()
	if err != nil {
		t.Fatal(err)
	}
	if !always {
		t.Error("nats-server does not fsync every write (sync_always false)")
	}
	if !strings.HasPrefix(got, store) {
		t.Errorf("JetStream store dir %q, want under %q", got, store)
	}
	c, err := net.DialTimeout("tcp", strings.TrimPrefix(n.url(), "nats://"), time.Second)
	if err != nil {
		t.Fatalf("client port: %v", err)
	}
	_ = c.Close()

	n.stop()
	if !n.exited() {
		t.Fatal("nats-server still running after stop")
	}
	if p := n.logProblems(); len(p) > 0 {
		t.Errorf("nats-server logged problems: %v", p)
	}
}

func TestNATSLogProblems(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nats-server.log")
	log := `[7] 2026/12/01 20:54:50.211416 [INF] Starting nats-server
[7] 2026/12/01 20:54:51.000000 [WRN] JetStream resource limits exceeded for server
[7] 2026/12/01 20:54:52.000000 [WRN] JetStream resource limits exceeded for server
[7] 2026/12/01 20:54:53.000000 [ERR] JetStream out of resources, will be DISABLED
[7] 2026/12/01 20:54:50.300000 [WRN] Healthcheck failed: "failed to be ready for connections after 1ms: server"
`
	if err := os.WriteFile(path, []byte(log), 0o600); err != nil {
		t.Fatal(err)
	}
	got := (&natsServer{logPath: path}).logProblems()
	want := map[string]int{
		"WRN: JetStream resource limits exceeded for server": 2,
		"ERR: JetStream out of resources, will be DISABLED":  1,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("logProblems = %v, want %v", got, want)
	}
}

// TestRenderNATS: relay-nats's Caddyfile names its own nats-server, and
// the other variants none.
func TestRenderNATS(t *testing.T) {
	base := t.TempDir()
	c, err := newServerConf(base, kindNATS, "http://127.0.0.1:1/okhi", 4)
	if err != nil {
		t.Fatal(err)
	}
	if c.natsPort == 0 || c.natsMonitor == 0 || c.natsPort == c.natsMonitor {
		t.Fatalf("nats ports %d, %d", c.natsPort, c.natsMonitor)
	}
	b, err := os.ReadFile(c.caddyfile())
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("storage nats nats://127.0.0.1:%d\n", c.natsPort); !strings.Contains(string(b), want) {
		t.Errorf("Caddyfile without %q:\n%s", want, b)
	}
	bolt, err := newServerConf(base, kindBolt, "http://127.0.0.1:1/okhi", 4)
	if err != nil {
		t.Fatal(err)
	}
	if bolt.natsPort != 0 || strings.Contains(bolt.render(), "nats") {
		t.Errorf("relay-bolt's Caddyfile names NATS:\n%s", bolt.render())
	}
}

func TestParseList(t *testing.T) {
	got, err := parseList(" respond, relay-nats,respond,", allKinds)
	if err != nil || fmt.Sprint(got) != "[respond relay-nats]" {
		t.Errorf("parseList = %v, %v; want [respond relay-nats]", got, err)
	}
	for _, bad := range []string{"relay-kafka", "", " , "} {
		if _, err := parseList(bad, allKinds); err == nil {
			t.Errorf("parseList(%q): no error", bad)
		}
	}
	o := options{servers: []string{kindNATS}, scenarios: []string{"backlog"}}
	if o.natsNeeded() {
		t.Error("nats-server needed for backlog, which relay-nats does not run")
	}
	o.scenarios = append(o.scenarios, "latency")
	if !o.natsNeeded() {
		t.Error("nats-server not needed for relay-nats's latency")
	}
}
