package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"
)

// TestAckP99 reads the 99th percentile's bucket from a Prometheus text
// page like Caddy's.
func TestAckP99(t *testing.T) {
	page := `# HELP caddy_webhook_relay_ack_duration_seconds Time from the start of a request to its answer.
# TYPE caddy_webhook_relay_ack_duration_seconds histogram
caddy_webhook_relay_ack_duration_seconds_bucket{relay="bench",le="0.001"} 500
caddy_webhook_relay_ack_duration_seconds_bucket{relay="bench",le="0.0025"} 980
caddy_webhook_relay_ack_duration_seconds_bucket{relay="bench",le="0.005"} 995
caddy_webhook_relay_ack_duration_seconds_bucket{relay="bench",le="0.01"} 1000
caddy_webhook_relay_ack_duration_seconds_bucket{relay="bench",le="+Inf"} 1000
caddy_webhook_relay_ack_duration_seconds_sum{relay="bench"} 1.2
caddy_webhook_relay_ack_duration_seconds_count{relay="bench"} 1000
caddy_webhook_relay_pending{relay="bench",target="legacy"} 3
`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprint(w, page)
	}))
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	admin, _ := strconv.Atoi(port)
	s := &server{conf: &serverConf{admin: admin}}
	got, err := s.ackP99()
	if err != nil || got != 5*time.Millisecond {
		t.Errorf("ackP99 = %s, %v; want 5ms (995 of 1000 at or under it)", got, err)
	}
	page = "caddy_webhook_relay_pending 1\n"
	if _, err := s.ackP99(); err == nil {
		t.Error("ackP99 of a page without acks: no error")
	}
}

// TestMergeRounds: each relay's ratio is taken to its own round's
// respond, and the figures left are the medians.
func TestMergeRounds(t *testing.T) {
	round := func(respond, bolt float64) map[string]*burstFigures {
		return map[string]*burstFigures{
			kindRespond: {acks: respond},
			kindBolt:    {acks: bolt, rss: bolt / 100, anonRSS: 60 - bolt/200},
		}
	}
	r := &runner{}
	r.mergeRounds([]map[string]*burstFigures{round(10000, 3000), round(20000, 5000), round(16000, 4000)})
	if got := fmt.Sprint(r.burstRatios[kindBolt]); got != "[0.3 0.25 0.25]" {
		t.Errorf("ratios %s, want [0.3 0.25 0.25]", got)
	}
	if m := median(r.burstRatios[kindBolt]); m != 0.25 {
		t.Errorf("median ratio %v, want 0.25", m)
	}
	if b := r.burst[kindBolt]; b.acks != 4000 || b.rss != 50 || b.anonRSS != 45 {
		t.Errorf("merged bolt figures %+v, want median acks 4000, the largest RSS 50 and the largest anonymous RSS 45", b)
	}
	if _, ok := r.burstRatios[kindMemory]; ok {
		t.Error("a ratio for a server that never ran")
	}
	if len(r.toBolt) != 0 {
		t.Errorf("ratios to relay-bolt %v without relay-nats or relay-bolt-jq", r.toBolt)
	}
}

// TestMergeRoundsNATS: relay-nats is compared with relay-bolt of the same
// round, and a round without relay-bolt gives no ratio.
func TestMergeRoundsNATS(t *testing.T) {
	r := &runner{}
	r.mergeRounds([]map[string]*burstFigures{
		{kindRespond: {acks: 10000}, kindBolt: {acks: 3000}, kindNATS: {acks: 1500, rss: 40, natsRSS: 30}},
		{kindRespond: {acks: 20000}, kindBolt: {acks: 4000}, kindNATS: {acks: 3000, rss: 50, natsRSS: 20}},
		{kindRespond: {acks: 20000}, kindNATS: {acks: 3000}},
	})
	if got := fmt.Sprint(r.toBolt[kindNATS]); got != "[0.5 0.75]" {
		t.Errorf("relay-nats to relay-bolt %s, want [0.5 0.75]", got)
	}
	if got := fmt.Sprint(r.burstRatios[kindNATS]); got != "[0.15 0.15 0.15]" {
		t.Errorf("relay-nats to respond %s, want [0.15 0.15 0.15]", got)
	}
	if b := r.burst[kindNATS]; b.acks != 3000 || b.rss != 50 || b.natsRSS != 30 {
		t.Errorf("merged relay-nats figures %+v, want acks 3000, RSS 50, nats-server RSS 30", b)
	}
}
