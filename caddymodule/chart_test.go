package caddymodule

import (
	"bytes"
	"math"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

func TestBucketCountsAlignsOnTheNewestStep(t *testing.T) {
	series := make([]int64, 2*chartBucket+1)
	series[0] = 7                          // the oldest point holds one step only
	series[1] = 1                          // the next point's first step
	series[len(series)-1] = 3              // the step in progress is the last point
	series[len(series)-1-chartBucket] = -1 // never below zero
	got := bucketCounts(series)
	if want := []float64{7, 1, 3}; !slices.Equal(got, want) {
		t.Errorf("bucketCounts = %v, want %v", got, want)
	}
}

func TestBucketGaugeKeepsGaps(t *testing.T) {
	series := make([]int64, 3*chartBucket)
	for i := range series {
		series[i] = -1
	}
	series[2] = 4
	series[3] = 5 // the point's last sample wins
	series[len(series)-1] = 0
	got := bucketGauge(series)
	if got[0] != 5 || !math.IsNaN(got[1]) || got[2] != 0 {
		t.Errorf("bucketGauge = %v, want [5 NaN 0]", got)
	}
}

func TestNiceCeil(t *testing.T) {
	for in, want := range map[float64]float64{0: 2, 1: 2, 2: 2, 3: 5, 7: 10, 10: 10, 11: 20, 180: 200, 4100: 5000} {
		if got := niceCeil(in); got != want {
			t.Errorf("niceCeil(%v) = %v, want %v", in, got, want)
		}
	}
}

// TestRelayCharts renders the overview's charts from an engine's
// history: a line per series with data, a gauge's gap splitting its
// line, the same colour for a result on every chart, an empty chart
// saying so, and names escaped.
func TestRelayCharts(t *testing.T) {
	n := relay.HistorySteps
	steps := func(last ...int64) []int64 {
		s := make([]int64, n)
		copy(s[n-len(last):], last)
		return s
	}
	gaps := steps(2, 3)
	for i := range gaps[:n-2] {
		gaps[i] = -1
	}
	gaps[n-3*chartBucket] = 9 // an earlier sample, then none for a while
	h := relay.History{
		Step: relay.HistoryStep, End: time.Now(),
		Intake: map[string][]int64{
			relay.ResultAccepted: steps(10, 20), relay.ResultDuplicate: steps(1),
			relay.ResultInvalid: steps(), // nothing in the hour: no line
		},
		Deliveries: map[string]map[string][]int64{
			"a":        {"delivered": steps(5), "dead_lettered": steps(1)},
			"<b>x</b>": {"delivered": steps(4), "retried": steps(2)},
		},
		Pending: map[string][]int64{"a": steps(0, 0), "<b>x</b>": gaps},
	}
	charts := relayCharts(h)
	if len(charts) != 3 {
		t.Fatalf("%d charts, want 3", len(charts))
	}
	names := func(c chart) []string {
		var out []string
		for _, s := range c.Series {
			out = append(out, s.Name+"="+s.Legend)
		}
		return out
	}
	if got, want := names(charts[0]), []string{"accepted=30 in the hour", "duplicate=1 in the hour"}; !slices.Equal(got, want) {
		t.Errorf("intake series %v, want %v", got, want)
	}
	if got, want := names(charts[1]), []string{"dead_lettered=1 in the hour", "delivered=9 in the hour", "retried=2 in the hour"}; !slices.Equal(got, want) {
		t.Errorf("delivery series %v (summed over targets), want %v", got, want)
	}
	if got, want := names(charts[2]), []string{"<b>x</b>=3 now", "a=0 now"}; !slices.Equal(got, want) {
		t.Errorf("pending series %v, want %v", got, want)
	}
	if charts[0].Series[0].Color != charts[1].Series[1].Color {
		t.Error("accepted and delivered are drawn in different colours")
	}
	if lines := charts[2].Series[0].Lines; len(lines) != 2 || len(strings.Fields(lines[0])) != 2 {
		t.Errorf("a gauge with a gap is drawn as %q, want 2 lines, the lone sample as a line of two equal points", lines)
	}
	if charts[0].YTicks[2].Label != "50" {
		t.Errorf("intake's top label %q, want 50 (a stack of 31 in the last minute, rounded up)", charts[0].YTicks[2].Label)
	}
	accepted, duplicate := charts[0].Series[0].Bars, charts[0].Series[1].Bars
	if len(accepted) != 1 || len(duplicate) != 1 {
		t.Fatalf("intake bars: %d accepted, %d duplicate; want one each (the last minute)", len(accepted), len(duplicate))
	}
	if a, d := accepted[0], duplicate[0]; a.X != d.X || math.Abs(d.Y+d.H-a.Y) > 1e-9 || math.Abs(a.H/d.H-30) > 1e-9 {
		t.Errorf("duplicate's bar %+v is not stacked on accepted's %+v at 1:30", d, a)
	}

	var buf bytes.Buffer
	if err := consoleTemplates.ExecuteTemplate(&buf, "chart", charts[2]); err != nil {
		t.Fatalf("rendering: %v", err)
	}
	page := buf.String()
	if strings.Contains(page, "<b>") || !strings.Contains(page, "&lt;b&gt;x&lt;/b&gt;") {
		t.Errorf("a target's name is not escaped in the chart:\n%s", page)
	}
	if got := len(regexp.MustCompile(`<polyline class="k\d" points="[0-9., ]+"/>`).FindAllString(page, -1)); got != 3 {
		t.Errorf("%d polylines, want 3:\n%s", got, page)
	}

	empty := relayCharts(relay.History{Step: relay.HistoryStep, Intake: map[string][]int64{relay.ResultAccepted: steps()}})
	buf.Reset()
	if err := consoleTemplates.ExecuteTemplate(&buf, "chart", empty[0]); err != nil {
		t.Fatalf("rendering: %v", err)
	}
	if !empty[0].Empty || !strings.Contains(buf.String(), "Nothing in the last hour") || strings.Contains(buf.String(), "<svg") {
		t.Errorf("a chart with nothing to draw:\n%s", buf.String())
	}
}
