package caddymodule

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// The console's charts are inline SVG drawn here, so that the page
// fetches nothing and runs nothing. The engine keeps 10 s steps; a chart
// sums them to a minute, which is what a person reads off a line an
// hour wide.
const (
	chartBucket = 6   // engine steps per point
	chartWidth  = 420 // about as wide as a chart is drawn: labels stay readable
	chartHeight = 150
	chartLeft   = 40 // room for the y labels
	chartBottom = 20 // room for the x labels
)

// chart is one SVG chart and its legend.
type chart struct {
	Title  string
	Unit   string // what a point counts, for the y axis' title
	Width  int
	Height int
	Left   int // the x of the y axis
	Right  int // the plot's right edge
	LabelX int // where the y labels end
	LabelY int // the x labels' baseline
	Bottom int // the y of the x axis
	YTicks []chartTick
	XTicks []chartTick
	Series []chartSeries
	Empty  bool // nothing in the window: the chart says so instead
}

type chartBar struct{ X, Y, W, H float64 }

type chartTick struct {
	Pos   float64
	Label string
}

type chartSeries struct {
	Name  string
	Color int // index into the console's palette (--c0 ...)
	// Lines are polyline point lists; a gauge's missing samples split it.
	Lines []string
	// Bars are a count's part of each point's stack.
	Bars []chartBar
	// Legend is the figure beside the name: a count's total over the
	// hour, a gauge's last sample.
	Legend string
}

// seriesColor keeps a result's colour the same on every chart and every
// page: green for what went well, red for what was lost or refused.
var seriesColor = map[string]int{
	relay.ResultAccepted: 0, "delivered": 0,
	relay.ResultDuplicate: 1, "stale": 1,
	relay.ResultUnauthorized: 2, "retried": 2,
	relay.ResultInvalid: 3, relay.ResultTooLarge: 4,
	relay.ResultUnavailable: 5, "dead_lettered": 5,
}

const chartColors = 8

// bucketCounts sums a count series into points of chartBucket steps,
// the newest point holding the step in progress.
func bucketCounts(series []int64) []float64 {
	n := (len(series) + chartBucket - 1) / chartBucket
	out := make([]float64, n)
	for i := range series {
		// Align from the newest end, so the last point is whole steps.
		j := n - 1 - (len(series)-1-i)/chartBucket
		out[j] += float64(max(series[i], 0))
	}
	return out
}

// bucketGauge takes a gauge's last sample in each point; NaN where the
// point has none.
func bucketGauge(series []int64) []float64 {
	n := (len(series) + chartBucket - 1) / chartBucket
	out := make([]float64, n)
	for i := range out {
		out[i] = math.NaN()
	}
	for i, v := range series {
		if v >= 0 {
			out[n-1-(len(series)-1-i)/chartBucket] = float64(v)
		}
	}
	return out
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten, so the y
// labels (the top and its half) read as whole figures.
func niceCeil(v float64) float64 {
	if v <= 2 {
		return 2
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func countLabel(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(v/1e6, 'f', -1, 64) + "M"
	case v >= 1e4:
		return strconv.FormatFloat(v/1e3, 'f', -1, 64) + "k"
	}
	return strconv.FormatFloat(v, 'f', -1, 64)
}

// kind of chart: counts are stacked bars, so that every result shows
// however the others compare; a gauge is a line per series.
type chartKind int

const (
	stackedBars chartKind = iota
	lines
)

// newChart draws series (name to points, oldest first, all one length).
// legend gives each series' figure.
func newChart(kind chartKind, title, unit string, step time.Duration, series map[string][]float64, legend func(string, []float64) string) chart {
	c := chart{
		Title: title, Unit: unit, Width: chartWidth, Height: chartHeight,
		Left: chartLeft, Right: chartWidth - 8, LabelX: chartLeft - 4,
		LabelY: chartHeight - 4, Bottom: chartHeight - chartBottom,
	}
	names := make([]string, 0, len(series))
	points := 0
	for name, s := range series {
		names = append(names, name)
		points = max(points, len(s))
	}
	sort.Strings(names)
	// The top of the scale: the highest stack, or the highest sample.
	var top float64
	stack := make([]float64, points)
	for _, name := range names {
		for i, v := range series[name] {
			if math.IsNaN(v) {
				continue
			}
			if kind == stackedBars {
				stack[i] += v
				top = max(top, stack[i])
			} else {
				top = max(top, v)
			}
		}
	}
	top = niceCeil(top)
	plotW := float64(c.Right - chartLeft)
	plotH := float64(c.Bottom - 8)
	slot := plotW / float64(max(points, 1))
	x := func(i int) float64 {
		if kind == stackedBars {
			return float64(chartLeft) + slot*float64(i)
		}
		if points <= 1 {
			return float64(chartLeft)
		}
		return float64(chartLeft) + plotW*float64(i)/float64(points-1)
	}
	y := func(v float64) float64 { return float64(c.Bottom) - plotH*v/top }
	for _, f := range []float64{0, 0.5, 1} {
		c.YTicks = append(c.YTicks, chartTick{Pos: y(top * f), Label: countLabel(top * f)})
	}
	span := time.Duration(points*chartBucket) * step
	for _, f := range []float64{0, 0.5, 1} {
		label := "now"
		if f < 1 {
			label = fmt.Sprintf("−%d min", int(math.Round((1-f)*span.Minutes())))
		}
		c.XTicks = append(c.XTicks, chartTick{Pos: float64(chartLeft) + plotW*f, Label: label})
	}
	clear(stack)
	for i, name := range names {
		s := series[name]
		color, ok := seriesColor[name]
		if !ok {
			color = i % chartColors
		}
		cs := chartSeries{Name: name, Color: color, Legend: legend(name, s)}
		if kind == stackedBars {
			for j, v := range s {
				if v <= 0 {
					continue
				}
				cs.Bars = append(cs.Bars, chartBar{
					X: x(j) + 0.5, W: max(slot-1, 1),
					Y: y(stack[j] + v), H: plotH * v / top,
				})
				stack[j] += v
			}
		} else {
			cs.Lines = polylines(s, x, y)
		}
		c.Series = append(c.Series, cs)
	}
	c.Empty = true
	for _, cs := range c.Series {
		if len(cs.Lines) > 0 || len(cs.Bars) > 0 {
			c.Empty = false
		}
	}
	return c
}

// polylines draws a series as lines, split where samples are missing.
func polylines(s []float64, x func(int) float64, y func(float64) float64) []string {
	var out []string
	var line strings.Builder
	points := 0
	end := func() {
		if points == 1 {
			// A lone sample: a line of no length, drawn as a dot by its
			// round caps.
			fmt.Fprintf(&line, " %s", line.String())
		}
		if points > 0 {
			out = append(out, line.String())
		}
		line.Reset()
		points = 0
	}
	for j, v := range s {
		if math.IsNaN(v) {
			end()
			continue
		}
		if points > 0 {
			line.WriteByte(' ')
		}
		fmt.Fprintf(&line, "%.1f,%.1f", x(j), y(v))
		points++
	}
	end()
	return out
}

func totalLegend(_ string, s []float64) string {
	var sum float64
	for _, v := range s {
		sum += v
	}
	return countLabel(sum) + " in the hour"
}

func lastLegend(_ string, s []float64) string {
	for i := len(s) - 1; i >= 0; i-- {
		if !math.IsNaN(s[i]) {
			return countLabel(s[i]) + " now"
		}
	}
	return "no sample"
}

// relayCharts are the overview's three charts of one relay: intake by
// result, deliveries by result over every target, pending per target.
func relayCharts(h relay.History) []chart {
	intake := map[string][]float64{}
	for result, s := range h.Intake {
		if b := bucketCounts(s); hasData(b) {
			intake[result] = b
		}
	}
	deliveries := map[string][]float64{}
	for _, byResult := range h.Deliveries {
		for result, s := range byResult {
			b := bucketCounts(s)
			if !hasData(b) {
				continue
			}
			if sum := deliveries[result]; sum != nil {
				for i := range sum {
					sum[i] += b[i]
				}
			} else {
				deliveries[result] = b
			}
		}
	}
	pending := map[string][]float64{}
	for target, s := range h.Pending {
		pending[target] = bucketGauge(s)
	}
	unit := "per minute"
	return []chart{
		newChart(stackedBars, "Requests received, by result", unit, h.Step, intake, totalLegend),
		newChart(stackedBars, "Delivery attempts, by result", unit, h.Step, deliveries, totalLegend),
		newChart(lines, "Pending, per target", "deliveries", h.Step, pending, lastLegend),
	}
}

func hasData(s []float64) bool {
	for _, v := range s {
		if v > 0 {
			return true
		}
	}
	return false
}
