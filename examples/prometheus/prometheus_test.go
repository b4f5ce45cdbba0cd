// Package prometheusexample_test keeps the Grafana dashboard and the alert
// rules honest against a real Prometheus: it scrapes a real Caddy running
// the relay while a scenario makes every series move, and then every
// dashboard expression (with Grafana's variables substituted) must parse
// and return data, and every alert rule must load and evaluate.
package prometheusexample_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/webhook-relay/caddy-webhook-relay/caddymodule"
)

const (
	dashboardPath = "../grafana/dashboard.json"
	alertsPath    = "alerts.yml"

	// relayPrefix starts the relay's name, made unique per run: the
	// collectors live as long as the process, so with -count=2 a second
	// run's relay of the same name would start with the first's counts.
	relayPrefix = "okhi"
	secret      = "prometheus-test-secret"

	// rateInterval stands in for Grafana's $__rate_interval: at least four
	// of the test's 1 s scrapes, as Grafana makes it.
	rateInterval = "1m"
)

// The scenario's targets, by name in the relay's config.
const (
	targetOK    = "ok"   // answers 200
	targetDown  = "down" // answers 503: retried, then held
	targetBad   = "bad"  // answers 400: dead letters
	targetStale = "feed" // answers 200, with drop_stale
)

var runs atomic.Int32

// TestDashboardAndAlertsOnPrometheus is issue 10's item 5, end to end.
func TestDashboardAndAlertsOnPrometheus(t *testing.T) {
	promBin := prometheusBinary(t)
	dash := readDashboard(t)
	relayName := fmt.Sprintf("%s-%d", relayPrefix, runs.Add(1))

	// Targets first: their cleanups then run after Caddy's stop.
	ok := newTarget(t, http.StatusOK)
	down := newTarget(t, http.StatusServiceUnavailable)
	bad := newTarget(t, http.StatusBadRequest)
	feed := newTarget(t, http.StatusOK)

	ports := freePorts(t, 3)
	relayPort, metricsPort, promPort := ports[0], ports[1], ports[2]
	relayURL := fmt.Sprintf("http://127.0.0.1:%d/", relayPort)
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort)

	dir := t.TempDir()
	startCaddy(t, fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	grace_period 1ns
	storage file_system %[1]s
	log {
		level ERROR
	}
}

http://127.0.0.1:%[2]d {
	bind 127.0.0.1
	webhook_relay %[3]s {
		auth_header X-Secret %[4]s
		storage %[5]s
		forward %[6]s %[7]s {
			backoff 10ms 50ms
		}
		forward %[8]s %[9]s {
			backoff 10ms 50ms
			max_attempts 1000
		}
		forward %[10]s %[11]s {
			backoff 10ms 50ms
		}
		forward %[12]s %[13]s {
			backoff 10ms 50ms
			drop_stale data.location.id event_timestamp
		}
	}
}

http://127.0.0.1:%[14]d {
	bind 127.0.0.1
	metrics
}
`, filepath.Join(dir, "caddy"), relayPort, relayName, secret, filepath.Join(dir, "relay"),
		targetOK, ok.URL, targetDown, down.URL, targetBad, bad.URL, targetStale, feed.URL, metricsPort))

	prom := startPrometheus(t, promBin, promPort, metricsPort, dir)
	start := time.Now()
	// The relay's counters start at 0 before any event, and Prometheus
	// sees that first: an increase() over a counter whose first sample is
	// already 3 is 0, so the dead-letter alert would stay quiet.
	first := fmt.Sprintf(`caddy_webhook_relay_deliveries_total{relay=%q,target=%q,result="dead_lettered"} == 0`, relayName, targetBad)
	waitFor(t, 30*time.Second, "Prometheus's first scrape", func() bool {
		res, err := prom.query(first)
		if err != nil {
			t.Fatalf("query %s: %v", first, err)
		}
		return len(res) > 0
	})

	// The scenario: every received and every delivery result, a target
	// held, dead letters and a stale event.
	c := &http.Client{Timeout: 10 * time.Second}
	send := func(method, auth, body string, want int) {
		t.Helper()
		req, err := http.NewRequest(method, relayURL, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Secret", auth)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, relayURL, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("%s %s: %d (%s), want %d", method, relayURL, resp.StatusCode, b, want)
		}
	}
	send(http.MethodPost, secret, event("e1", "A", 200), http.StatusOK)
	send(http.MethodPost, secret, event("e1", "A", 200), http.StatusOK) // duplicate
	// e2 is older than e1 for the same address: stale once e1 is
	// delivered. The delivered count rises after the relay has noted e1's
	// time, which is what makes e2 stale.
	waitFor(t, 10*time.Second, "e1 delivered to "+targetStale, func() bool {
		return scrapeValue(t, c, metricsURL, "caddy_webhook_relay_deliveries_total",
			fmt.Sprintf(`relay=%q,result="delivered",target=%q`, relayName, targetStale)) >= 1
	})
	send(http.MethodPost, secret, event("e2", "A", 100), http.StatusOK)
	send(http.MethodPost, secret, event("e3", "B", 300), http.StatusOK)
	send(http.MethodPost, "wrong", event("e4", "B", 400), http.StatusUnauthorized)
	send(http.MethodGet, secret, "", http.StatusMethodNotAllowed)

	// Polling Prometheus, not sleeping: each series the panels and alerts
	// read has been scraped with the value the scenario gave it.
	sel := func(name, labels string) string {
		return fmt.Sprintf(`%s{relay=%q,%s}`, name, relayName, labels)
	}
	scraped := []string{
		sel("caddy_webhook_relay_received_total", `result="accepted"`) + " >= 3",
		sel("caddy_webhook_relay_received_total", `result="duplicate"`) + " >= 1",
		sel("caddy_webhook_relay_received_total", `result="unauthorized"`) + " >= 1",
		sel("caddy_webhook_relay_received_total", `result="invalid"`) + " >= 1",
		sel("caddy_webhook_relay_deliveries_total", `result="delivered",target="`+targetOK+`"`) + " >= 3",
		sel("caddy_webhook_relay_deliveries_total", `result="retried",target="`+targetDown+`"`) + " >= 10",
		sel("caddy_webhook_relay_deliveries_total", `result="dead_lettered",target="`+targetBad+`"`) + " >= 3",
		sel("caddy_webhook_relay_deliveries_total", `result="stale",target="`+targetStale+`"`) + " >= 1",
		sel("caddy_webhook_relay_target_held", `target="`+targetDown+`"`) + " == 1",
		sel("caddy_webhook_relay_pending", `target="`+targetDown+`"`) + " >= 3",
		sel("caddy_webhook_relay_oldest_pending_seconds", `target="`+targetDown+`"`) + " > 0",
		sel("caddy_webhook_relay_dead_letters", `target="`+targetBad+`"`) + " >= 3",
		sel("caddy_webhook_relay_store_up", `job="caddy"`) + " == 1",
		sel("caddy_webhook_relay_dedupe_entries", `job="caddy"`) + " >= 3",
		sel("caddy_webhook_relay_delivery_latency_seconds_count", `target="`+targetOK+`"`) + " >= 3",
		sel("caddy_webhook_relay_ack_duration_seconds_count", `job="caddy"`) + " >= 4",
	}
	for _, q := range scraped {
		waitFor(t, 30*time.Second, "Prometheus to scrape "+q, func() bool {
			res, err := prom.query(q)
			if err != nil {
				t.Fatalf("query %s: %v", q, err)
			}
			return len(res) > 0
		})
	}
	t.Logf("scenario scraped %s after Prometheus started", time.Since(start).Round(time.Millisecond))

	t.Run("dashboard", func(t *testing.T) { checkDashboard(t, prom, dash, relayName, scrapeFamilies(t, c, metricsURL)) })
	t.Run("alerts", func(t *testing.T) { checkAlerts(t, prom, relayName) })
}

// checkDashboard runs every panel expression, under every combination of
// the dashboard's variables, and the variables' own queries.
func checkDashboard(t *testing.T, prom *promServer, dash dashboard, relayName string, families []string) {
	if dash.SchemaVersion < 39 {
		t.Errorf("schemaVersion %d: current Grafana writes 39 or later", dash.SchemaVersion)
	}
	values := variableValues(t, dash, relayName)
	combos := combinations(values)
	panels := dash.allPanels()
	var exprs []string
	shown := 0
	for _, p := range panels {
		if p.Type == "row" {
			continue
		}
		shown++
		if strings.TrimSpace(p.Description) == "" {
			t.Errorf("panel %q has no description", p.Title)
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: datasource %+v, want the ${datasource} variable", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			exprs = append(exprs, q.Expr)
			for _, vars := range combos {
				expr := substitute(t, q.Expr, vars)
				// Data: a number, not only the NaN of a quantile or a
				// ratio over nothing.
				waitFor(t, 15*time.Second, fmt.Sprintf("panel %q query %s to return data: %s", p.Title, q.RefID, expr), func() bool {
					res, err := prom.query(expr)
					if err != nil {
						t.Fatalf("panel %q query %s: %s: %v", p.Title, q.RefID, expr, err)
					}
					return slices.ContainsFunc(res, func(s sample) bool { return s.Value[1] != "NaN" })
				})
			}
		}
	}
	// Every metric the relay exports is on some panel.
	all := strings.Join(exprs, "\n")
	for _, f := range families {
		if !strings.Contains(all, f) {
			t.Errorf("metric %s is on no panel", f)
		}
	}
	if len(families) < 12 {
		t.Errorf("the relay exports only %v", families)
	}

	// The variables' own queries list what the scenario made.
	want := map[string][]string{
		"relay":  {relayName},
		"target": {targetOK, targetDown, targetBad, targetStale},
	}
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q string
		if err := json.Unmarshal(v.Query, &q); err != nil {
			t.Errorf("variable %s: query %s is not a string: %v", v.Name, v.Query, err)
			continue
		}
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(<selector>, <label>)", v.Name, q)
			continue
		}
		match := substitute(t, m[1], combos[0])
		got, err := prom.labelValues(m[2], match)
		if err != nil {
			t.Errorf("variable %s: %v", v.Name, err)
			continue
		}
		for _, w := range want[v.Name] {
			if !slices.Contains(got, w) {
				t.Errorf("variable %s: values %v, want %s among them", v.Name, got, w)
			}
		}
	}
	t.Logf("%d panels, %d queries, each under %d combinations of variables", shown, len(exprs), len(combos))
}

// checkAlerts: Prometheus loaded every rule of alerts.yml and evaluates
// it without error; each rule's expression parses through the query API;
// the scenario's dead letters fire their alert and the held target's is
// pending (its for: has not passed).
func checkAlerts(t *testing.T, prom *promServer, relayName string) {
	src, err := os.ReadFile(alertsPath)
	if err != nil {
		t.Fatal(err)
	}
	wantRules := regexp.MustCompile(`(?m)^\s*- alert: `).FindAll(src, -1)
	var groups []ruleGroup
	defer func() {
		if t.Failed() {
			t.Logf("rules: %+v", groups)
		}
	}()
	waitFor(t, 15*time.Second, "every rule evaluated, dead letters firing and the held target pending", func() bool {
		groups, err = prom.rules()
		if err != nil {
			t.Fatalf("GET /api/v1/rules: %v", err)
		}
		n := 0
		for _, g := range groups {
			for _, r := range g.Rules {
				n++
				if r.Health != "ok" {
					return false
				}
			}
		}
		return n == len(wantRules) &&
			hasAlert(groups, "WebhookRelayDeadLetters", relayName, targetBad, "firing") &&
			hasAlert(groups, "WebhookRelayTargetDown", relayName, targetDown, "pending")
	})
	if len(groups) != 1 || groups[0].Name != "webhook-relay" {
		t.Errorf("rule groups %+v, want one, webhook-relay", groups)
	}
	for _, g := range groups {
		for _, r := range g.Rules {
			if r.LastError != "" {
				t.Errorf("rule %s: %s", r.Name, r.LastError)
			}
			if _, err := prom.query(r.Query); err != nil {
				t.Errorf("rule %s: %s: %v", r.Name, r.Query, err)
			}
		}
	}
	// Nothing in the scenario should page for the sender's side.
	for _, name := range []string{"WebhookRelayAckSlow", "WebhookRelayRefusing", "WebhookRelayStoreDown"} {
		for _, g := range groups {
			for _, r := range g.Rules {
				if r.Name == name && len(r.Alerts) > 0 {
					t.Errorf("rule %s has alerts %+v in a scenario that should not raise it", name, r.Alerts)
				}
			}
		}
	}
}

func hasAlert(groups []ruleGroup, rule, relayName, target, state string) bool {
	for _, g := range groups {
		for _, r := range g.Rules {
			if r.Name != rule {
				continue
			}
			for _, a := range r.Alerts {
				if a.Labels["target"] == target && a.Labels["relay"] == relayName && a.State == state {
					return true
				}
			}
		}
	}
	return false
}

// event is an OkHi v3 event for an address at a time.
func event(id, address string, at int) string {
	return fmt.Sprintf(`{"event_type":"address_verification.completed","event_id":%q,"api_version":"v3",`+
		`"event_timestamp":%d,"data":{"location":{"id":%q},"address_verification":{"id":"ONYgUOybCU","status":"verified"}}}`,
		id, at, address)
}

// prometheusBinary finds the prometheus command, or skips (fails on CI,
// which installs it).
func prometheusBinary(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err == nil {
		return bin
	}
	msg := "the prometheus binary is not on PATH: install Debian's `prometheus` package (apt-get install prometheus)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// newTarget is an internal service answering every request with status.
func newTarget(t *testing.T, status int) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(status)
	}))
	t.Cleanup(s.Close)
	return s
}

// freePorts picks n ports free on 127.0.0.1, all held until all are
// picked so that none is picked twice.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports
}

// startCaddy runs a Caddyfile config in this process until the test ends.
func startCaddy(t *testing.T, caddyfile string) {
	t.Helper()
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapting the Caddyfile: %v", err)
	}
	for _, w := range warnings {
		t.Errorf("Caddyfile warning: line %d: %s", w.Line, w.Message)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading the config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
	})
}

// promServer is a running prometheus process.
type promServer struct {
	base   string
	client *http.Client
}

// startPrometheus runs prometheus on 127.0.0.1:port, scraping Caddy's
// metrics site every second and evaluating alerts.yml every second, until
// the test ends. Its log is shown when the test fails.
func startPrometheus(t *testing.T, bin string, port, metricsPort int, dir string) *promServer {
	t.Helper()
	rules, err := filepath.Abs(alertsPath)
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "prometheus.yml")
	err = os.WriteFile(config, fmt.Appendf(nil, `global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: caddy
    static_configs:
      - targets: ["127.0.0.1:%d"]
`, rules, metricsPort), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "prometheus.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.CommandContext(ctx, bin,
		"--config.file="+config,
		"--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address="+addr,
		"--log.level=warn",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// A clean stop first; killed if it takes longer.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		err := <-exited
		// Canceled: it stopped on the signal, with status 0.
		var exitErr *exec.ExitError
		if err != nil && !errors.Is(err, context.Canceled) && !errors.As(err, &exitErr) {
			t.Errorf("stopping prometheus: %v", err)
		}
		logFile.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logPath); err == nil {
				t.Logf("prometheus log:\n%s", b)
			}
		}
	})
	p := &promServer{base: "http://" + addr, client: &http.Client{Timeout: 10 * time.Second}}
	waitFor(t, 30*time.Second, "prometheus to be ready on "+addr, func() bool {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("prometheus exited: %v", err)
		default:
		}
		resp, err := p.client.Get(p.base + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// apiResponse is the envelope of every answer of Prometheus's HTTP API.
type apiResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Data      json.RawMessage `json:"data"`
}

func (p *promServer) get(path string, params url.Values, out any) error {
	resp, err := p.client.Get(p.base + path + "?" + params.Encode())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var r apiResponse
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return fmt.Errorf("decoding the answer (%s): %w", resp.Status, err)
	}
	if r.Status != "success" {
		return fmt.Errorf("%s: %s: %s", resp.Status, r.ErrorType, r.Error)
	}
	return json.Unmarshal(r.Data, out)
}

// sample is one series of a query's answer.
type sample struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"`
}

// query evaluates expr now; a scalar answer counts as one sample.
func (p *promServer) query(expr string) ([]sample, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.get("/api/v1/query", url.Values{"query": {expr}}, &data); err != nil {
		return nil, err
	}
	switch data.ResultType {
	case "vector":
		var out []sample
		err := json.Unmarshal(data.Result, &out)
		return out, err
	case "scalar":
		var v [2]any
		err := json.Unmarshal(data.Result, &v)
		return []sample{{Value: v}}, err
	default:
		return nil, fmt.Errorf("result type %q, want a vector", data.ResultType)
	}
}

func (p *promServer) labelValues(label, match string) ([]string, error) {
	var out []string
	err := p.get("/api/v1/label/"+label+"/values", url.Values{"match[]": {match}}, &out)
	return out, err
}

type ruleGroup struct {
	Name  string `json:"name"`
	Rules []struct {
		Name      string `json:"name"`
		Query     string `json:"query"`
		Health    string `json:"health"`
		LastError string `json:"lastError"`
		Alerts    []struct {
			Labels map[string]string `json:"labels"`
			State  string            `json:"state"`
		} `json:"alerts"`
	} `json:"rules"`
}

func (p *promServer) rules() ([]ruleGroup, error) {
	var data struct {
		Groups []ruleGroup `json:"groups"`
	}
	err := p.get("/api/v1/rules", url.Values{"type": {"alert"}}, &data)
	return data.Groups, err
}

// scrapeValue reads one sample from Caddy's metrics endpoint; labels are
// in the exposition's (sorted) order. A missing sample reads 0.
func scrapeValue(t *testing.T, c *http.Client, metricsURL, name, labels string) float64 {
	t.Helper()
	prefix := name + "{" + labels + "} "
	for line := range strings.Lines(scrapeText(t, c, metricsURL)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metrics line %q: %v", line, err)
			}
			return f
		}
	}
	return 0
}

// scrapeFamilies lists the relay's metric families Caddy exports.
func scrapeFamilies(t *testing.T, c *http.Client, metricsURL string) []string {
	t.Helper()
	var out []string
	for line := range strings.Lines(scrapeText(t, c, metricsURL)) {
		if rest, ok := strings.CutPrefix(line, "# TYPE caddy_webhook_relay_"); ok {
			out = append(out, "caddy_webhook_relay_"+strings.Fields(rest)[0])
		}
	}
	return out
}

func scrapeText(t *testing.T, c *http.Client, metricsURL string) string {
	t.Helper()
	resp, err := c.Get(metricsURL)
	if err != nil {
		t.Fatalf("GET %s: %v", metricsURL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s, %v", metricsURL, resp.Status, err)
	}
	return string(b)
}

// dashboard is the part of Grafana's dashboard model the test reads.
type dashboard struct {
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Templating    struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type panel struct {
	Type        string `json:"type"`
	Title       string `json:"title"`
	Description string `json:"description"`
	Datasource  *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}

type variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Multi      bool            `json:"multi"`
	IncludeAll bool            `json:"includeAll"`
	AllValue   string          `json:"allValue"`
	Options    []struct {
		Value string `json:"value"`
	} `json:"options"`
}

func readDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	return d
}

// allPanels flattens collapsed rows.
func (d dashboard) allPanels() []panel {
	var out []panel
	for _, p := range d.Panels {
		out = append(out, p)
		out = append(out, p.Panels...)
	}
	return out
}

// variableValues gives each dashboard variable the values to try: for a
// relay or target, everything (its allValue) and a selection, written as
// Grafana writes several values into a regex; for a custom variable,
// each of its options. The datasource variable appears in no expression.
func variableValues(t *testing.T, d dashboard, relayName string) map[string][]string {
	t.Helper()
	selections := map[string]string{"relay": relayName, "target": "(" + targetOK + "|" + targetStale + ")"}
	out := map[string][]string{}
	names := map[string]bool{}
	for _, v := range d.Templating.List {
		names[v.Name] = true
		switch v.Type {
		case "datasource":
		case "query":
			sel, ok := selections[v.Name]
			if !ok {
				t.Fatalf("variable %s: the test has no value for it", v.Name)
			}
			if !v.Multi || !v.IncludeAll || v.AllValue == "" {
				t.Errorf("variable %s: multi %v, includeAll %v, allValue %q: want several values, All, and an allValue regex",
					v.Name, v.Multi, v.IncludeAll, v.AllValue)
			}
			out[v.Name] = []string{v.AllValue, sel}
		case "custom":
			for _, o := range v.Options {
				out[v.Name] = append(out[v.Name], o.Value)
			}
			// Grafana rebuilds the options from the query, a comma-separated
			// list of "text : value": the two must agree.
			var q string
			if err := json.Unmarshal(v.Query, &q); err != nil {
				t.Fatalf("variable %s: query %s: %v", v.Name, v.Query, err)
			}
			var fromQuery []string
			for opt := range strings.SplitSeq(q, ",") {
				_, value, _ := strings.Cut(opt, " : ")
				fromQuery = append(fromQuery, strings.TrimSpace(value))
			}
			if !slices.Equal(fromQuery, out[v.Name]) {
				t.Errorf("variable %s: query %q makes %q, options say %q", v.Name, q, fromQuery, out[v.Name])
			}
			if len(out[v.Name]) == 0 {
				t.Errorf("custom variable %s has no options", v.Name)
			}
		default:
			t.Errorf("variable %s: type %q the test does not know", v.Name, v.Type)
		}
	}
	for _, want := range []string{"datasource", "relay"} {
		if !names[want] {
			t.Errorf("the dashboard has no %s variable", want)
		}
	}
	return out
}

// combinations is the cartesian product of every variable's values.
func combinations(values map[string][]string) []map[string]string {
	out := []map[string]string{{}}
	for name, vs := range values {
		var next []map[string]string
		for _, c := range out {
			for _, v := range vs {
				m := map[string]string{name: v}
				for k, x := range c {
					m[k] = x
				}
				next = append(next, m)
			}
		}
		out = next
	}
	return out
}

// grafanaVar matches $name, ${name}, ${name:format} and [[name]].
var grafanaVar = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)`)

// builtins are Grafana's global variables, as they would be on a panel of
// the dashboard's default time range.
var builtins = map[string]string{
	"__rate_interval":    rateInterval,
	"__interval":         "15s",
	"__interval_ms":      "15000",
	"__range":            "6h",
	"__range_s":          "21600",
	"__range_ms":         "21600000",
	"__rate_interval_ms": "60000",
}

// substitute replaces every Grafana variable in expr; an unknown one
// fails the test.
func substitute(t *testing.T, expr string, vars map[string]string) string {
	t.Helper()
	return grafanaVar.ReplaceAllStringFunc(expr, func(m string) string {
		sub := grafanaVar.FindStringSubmatch(m)
		name := sub[1] + sub[2] + sub[3]
		if v, ok := vars[name]; ok {
			return v
		}
		if v, ok := builtins[name]; ok {
			return v
		}
		t.Fatalf("expression %q: variable %s is neither the dashboard's nor one the test knows of Grafana's", expr, m)
		return m
	})
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
