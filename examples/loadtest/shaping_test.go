package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
)

// TestRenderBoltJQ: relay-bolt-jq's Caddyfile is relay-bolt's with the
// three shaping lines in its forward block, and its program compiles.
func TestRenderBoltJQ(t *testing.T) {
	bolt := serverConf{kind: kindBolt, dir: "/tmp/x", port: 1, admin: 2, targetURL: "http://127.0.0.1:3/okhi", concurrency: 4}
	jq := bolt
	jq.kind = kindBoltJQ
	got := jq.render()
	want := strings.Replace(bolt.render(), "\t\t\ttimeout 5s\n", "\t\t\ttimeout 5s\n"+shapingLines(), 1)
	if got != want {
		t.Errorf("relay-bolt-jq's Caddyfile:\n%s\nwant relay-bolt's plus the shaping:\n%s", got, want)
	}
	for _, l := range []string{"transform jq `{id: .v2.address_verification_id,", "body_format form\n", "sign standard_webhooks whsec_"} {
		if !strings.Contains(got, l) {
			t.Errorf("Caddyfile without %q:\n%s", l, got)
		}
	}
	if strings.Contains(bolt.render(), "transform") {
		t.Errorf("relay-bolt's Caddyfile has a transform:\n%s", bolt.render())
	}
	if err := shape.CheckTransform(shapingJQ); err != nil {
		t.Errorf("the program does not compile: %v", err)
	}
}

// TestTargetChecksShaping: the target accepts what the relay's own
// pipeline builds from each of the generator's bodies with relay-bolt-jq's
// settings, and says so; a changed body and an unsigned run are reported.
func TestTargetChecksShaping(t *testing.T) {
	tg, err := startTarget()
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	p, err := shape.Compile(shape.Spec{
		Okhi: true, URL: "http://" + tg.addr + "/okhi",
		Transform: shapingJQ, Form: true, Secrets: []string{shapingSecret},
	})
	if err != nil {
		t.Fatal(err)
	}
	send := func(h http.Header, body []byte) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, "http://"+tg.addr+"/okhi", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header = h
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("target answered %s", resp.Status)
		}
	}

	tpls := renderTemplates(tg.addr)
	for id := range uint64(len(variants)) {
		// request picks the variant of an event id by id % len(variants).
		in, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(request(tpls, 0xabc0*uint64(len(variants))+id))))
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(in.Body)
		if err != nil {
			t.Fatal(err)
		}
		r, err := p.Build(t.Context(), shape.Input{ID: "evt-1", ReceivedAt: time.Now(), ContentType: in.Header.Get("Content-Type"), Body: body}, time.Now())
		if err != nil {
			t.Fatalf("variant %d: %v", id, err)
		}
		tg.reset()
		send(r.Header, r.Body)
		send(r.Header, []byte("id=not-checked")) // only the first signed request is
		note := tg.shapingNote()
		if !strings.HasPrefix(note, "one request checked: signature verified") {
			t.Errorf("variant %d: %s", id, note)
		}
		form, err := url.ParseQuery(string(r.Body))
		if err != nil {
			t.Fatal(err)
		}
		if got, want := form.Get("id"), fmt.Sprintf("%016x", 0xabc0*uint64(len(variants))+id); got != want {
			t.Errorf("variant %d: form id %q, want %q", id, got, want)
		}
		if variants[id].status == "" && form.Get("status") != "in_progress" {
			t.Errorf("variant %d without a status: form status %q, want in_progress", id, form.Get("status"))
		}
	}

	r, err := p.Build(t.Context(), shape.Input{ID: "evt-2", ReceivedAt: time.Now(), Body: []byte(`{"v2":{"address_verification_id":"0123456789abcdef"}}`)}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	tg.reset()
	send(r.Header, append(bytes.Clone(r.Body), "&x=1"...))
	if note := tg.shapingNote(); !strings.HasPrefix(note, "SHAPING CHECK FAILED: signature") {
		t.Errorf("a changed body: %s", note)
	}

	// A signature over a body without the fields: verified, then refused.
	wrong, err := shape.Compile(shape.Spec{Okhi: true, URL: "http://" + tg.addr + "/okhi", Transform: `{id: "short"}`, Form: true, Secrets: []string{shapingSecret}})
	if err != nil {
		t.Fatal(err)
	}
	r, err = wrong.Build(t.Context(), shape.Input{ID: "evt-3", ReceivedAt: time.Now(), Body: []byte(`{}`)}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	tg.reset()
	send(r.Header, r.Body)
	if note := tg.shapingNote(); !strings.HasPrefix(note, "SHAPING CHECK FAILED: form fields id, want id,location,mode,status,user") {
		t.Errorf("a body without the fields: %s", note)
	}

	tg.reset()
	send(http.Header{"Content-Type": {"application/json"}}, []byte(`{}`))
	if note := tg.shapingNote(); !strings.HasPrefix(note, "SHAPING NOT CHECKED") {
		t.Errorf("no signed request: %s", note)
	}
}

// TestShapingCost: relay-bolt-jq is compared with relay-bolt of the same
// rounds and with relay-bolt's sustained rate.
func TestShapingCost(t *testing.T) {
	r := &runner{}
	if got := r.shapingCost(); got != "" {
		t.Errorf("without relay-bolt-jq: %q", got)
	}
	r.mergeRounds([]map[string]*burstFigures{
		{kindRespond: {acks: 10000}, kindBolt: {acks: 4000}, kindBoltJQ: {acks: 3600}},
		{kindRespond: {acks: 10000}, kindBolt: {acks: 5000}, kindBoltJQ: {acks: 4000}},
		{kindRespond: {acks: 10000}, kindBolt: {acks: 4000}, kindBoltJQ: {acks: 3400}},
	})
	r.sustained = map[string]float64{kindBolt: 4000, kindBoltJQ: 3000}
	want := "burst 0.85x (median of 3 rounds: 0.90x, 0.80x, 0.85x), 0.36x respond; sustained 0.75x (3,000/s against 4,000/s)"
	if got := r.shapingCost(); got != want {
		t.Errorf("shapingCost:\n%s\nwant\n%s", got, want)
	}
	if _, ok := r.toBolt[kindNATS]; ok {
		t.Error("a relay-nats ratio without relay-nats")
	}
	r.sustained[kindBoltJQ] = 0
	if got := r.shapingCost(); !strings.HasSuffix(got, "; sustained: no rate tried kept up") {
		t.Errorf("shapingCost with no sustained rate kept up: %q", got)
	}
}
