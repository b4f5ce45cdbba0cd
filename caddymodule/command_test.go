package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestSimulate sends events the way OkHi does to a real relay: every
// distinct event accepted once, every re-send answered duplicate, and the
// target receives each event once.
func TestSimulate(t *testing.T) {
	const port = 9095
	target := newTarget(t, http.StatusOK)
	startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay sim {
		auth_header X-Secret %s
		storage %s
		forward legacy %s
	}`, secret, t.TempDir(), target.URL)))
	for _, version := range []string{"v2", "v3"} {
		t.Run(version, func(t *testing.T) {
			o := simOptions{
				URL:        fmt.Sprintf("http://localhost:%d/", port),
				Headers:    http.Header{"X-Secret": {secret}},
				Events:     40,
				Rate:       500,
				Duplicates: 0.3,
				Version:    version,
				Timeout:    15 * time.Second,
				Attempts:   3,
				RetryAfter: 10 * time.Millisecond,
			}
			s, err := simulate(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			s.report(&out)
			t.Log(out.String())
			if s.Results["accepted"] != 40 || s.Results["accepted"]+s.Results["duplicate"] != s.Sends || len(s.EventIDs) != 40 || s.GaveUp != 0 {
				t.Errorf("accepted %d, duplicate %d of %d sends, %d ids, gave up %d; want 40 accepted, the rest duplicate",
					s.Results["accepted"], s.Results["duplicate"], s.Sends, len(s.EventIDs), s.GaveUp)
			}
			ids := make([]string, 0, len(s.EventIDs))
			for id := range s.EventIDs {
				ids = append(ids, id)
			}
			target.waitDelivered(t, 10*time.Second, ids...)
			got := target.delivered()
			for _, id := range ids {
				if got[id] != 1 {
					t.Errorf("event %s delivered %d times, want once", id, got[id])
				}
			}
		})
	}
}

// TestSimulateRetries: a relay answering 503 is retried with backoff, as
// OkHi would, and a send that never gets a 2xx is reported.
func TestSimulateRetries(t *testing.T) {
	down := newTarget(t, http.StatusServiceUnavailable) // stands in for the relay
	s, err := simulate(context.Background(), simOptions{
		URL: down.URL, Headers: http.Header{}, Events: 3, Rate: 100, Version: "v2",
		Timeout: time.Second, Attempts: 3, RetryAfter: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if s.Requests != 9 || s.GaveUp != 3 || s.Statuses[503] != 9 {
		t.Errorf("requests %d, gave up %d, 503s %d; want 9, 3, 9", s.Requests, s.GaveUp, s.Statuses[503])
	}
	for _, bad := range []simOptions{{}, {URL: "http://x", Version: "v4", Events: 1, Rate: 1}, {URL: "http://x", Version: "v2", Events: 1, Rate: 1, Duplicates: 1}} {
		if _, err := simulate(context.Background(), bad); err == nil {
			t.Errorf("simulate(%+v) accepted bad options", bad)
		}
	}
}

// TestDeadLettersCommand drives list, delete and replay through the CLI
// against a running relay's admin API.
func TestDeadLettersCommand(t *testing.T) {
	const port = 9096
	target := newTarget(t, http.StatusBadRequest)
	tester := startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay cli {
		auth_header X-Secret %s
		storage %s
		forward crm %s
	}`, secret, t.TempDir(), target.URL)))
	url := fmt.Sprintf("http://localhost:%d/", port)
	var ids []string
	for i := range 3 {
		ids = append(ids, ack(t, post(t, tester, url, okhiEvent(fmt.Sprintf("cli-%d", i), "verified")), "accepted"))
	}
	run := func(args ...string) (string, error) {
		t.Helper()
		cmd := deadLettersCommand()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs(append(args, "--address", "localhost:2999", "--relay", "cli"))
		err := cmd.Execute()
		return out.String(), err
	}
	waitFor(t, 5*time.Second, "three dead letters", func() bool {
		out, err := run("list", "--all", "--limit", "2", "--json")
		return err == nil && strings.Count(out, "\n") == 3
	})
	out, err := run("list", "--all", "--limit", "2", "--json")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var dl deadLetterJSON
		if err := json.Unmarshal([]byte(line), &dl); err != nil || dl.Target != "crm" || dl.LastStatus != 400 {
			t.Errorf("list line %q: %+v, %v", line, dl, err)
		}
	}
	if out, err := run("delete", "--event-id", ids[0]); err != nil || out != "deleted 1\n" {
		t.Errorf("delete: %q, %v", out, err)
	}
	target.status.Store(http.StatusOK)
	if out, err := run("replay", "--target", "crm"); err != nil || out != "replayed 2\n" {
		t.Errorf("replay: %q, %v", out, err)
	}
	target.waitDelivered(t, 5*time.Second, ids[1:]...)
	if _, err := run("delete"); err == nil {
		t.Error("delete without --event-id succeeded")
	}
	cmd := deadLettersCommand()
	cmd.SetOut(&bytes.Buffer{})
	cmd.SetErr(&bytes.Buffer{})
	cmd.SetArgs([]string{"list", "--address", "localhost:2999", "--relay", "nope"})
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("list of an unknown relay: %v, want a 404 error", err)
	}
}
