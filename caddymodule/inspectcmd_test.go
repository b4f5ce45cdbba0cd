package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

// caddyCLI runs `caddy webhook-relay <args>` in-process, as caddy's root
// command does (usage silenced on errors, which cobra prints as one
// "Error:" line), and returns stdout, stderr and the error that makes
// caddy exit non-zero.
func caddyCLI(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	root := &cobra.Command{Use: "caddy", SilenceUsage: true}
	wr := &cobra.Command{Use: "webhook-relay"}
	addSubcommands(wr)
	root.AddCommand(wr)
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(append([]string{"webhook-relay"}, args...))
	err = root.Execute()
	return out.String(), errOut.String(), err
}

// tableRows reads a table printed by the CLI: each row as a map from
// header to cell, the cells cut at the columns where the headers start
// (headers are upper case, words one space apart; columns three).
func tableRows(t *testing.T, table string) []map[string]string {
	t.Helper()
	lines := strings.Split(strings.TrimRight(table, "\n"), "\n")
	header := lines[0]
	var starts []int
	var names []string
	for i := 0; i < len(header); {
		j := strings.Index(header[i:], "   ")
		end := len(header)
		if j >= 0 {
			end = i + j
		}
		starts = append(starts, i)
		names = append(names, strings.TrimSpace(header[i:end]))
		i = end
		for i < len(header) && header[i] == ' ' {
			i++
		}
	}
	var rows []map[string]string
	for _, line := range lines[1:] {
		if line == "" {
			break
		}
		r := map[string]string{}
		for k, s := range starts {
			end := len(line)
			if k+1 < len(starts) && starts[k+1] < len(line) {
				end = starts[k+1]
			}
			if s < len(line) {
				r[names[k]] = strings.TrimSpace(line[s:end])
			}
		}
		rows = append(rows, r)
	}
	return rows
}

func findRow(rows []map[string]string, col, value string) map[string]string {
	for _, r := range rows {
		if r[col] == value {
			return r
		}
	}
	return nil
}

// TestInspectCommands runs status, pending list, event, pause, resume and
// dead-letters list against a running relay, as tables and as JSON, and
// their one-line errors.
func TestInspectCommands(t *testing.T) {
	const port = 9172
	crm := newTarget(t, http.StatusOK)
	legacy := newTarget(t, http.StatusServiceUnavailable)
	audit := newTarget(t, http.StatusBadRequest)
	tester := startCaddy(t, inspectConfig(port, t.TempDir(), crm, legacy, audit, ""))
	c := tester.Client
	site := fmt.Sprintf("http://localhost:%d/", port)
	ids, _ := postEvents(t, tester, site, "cli", 2)
	crm.waitDelivered(t, 5*time.Second, ids...)
	waitFor(t, 5*time.Second, "2 dead letters at audit and an attempt of each at legacy", func() bool {
		a, _ := targetStats(t, c, "insp", "audit")
		return a.DeadLetters == 2 && legacy.arrived.Load() == 2
	})
	cli := func(t *testing.T, args ...string) string {
		t.Helper()
		out, errOut, err := caddyCLI(t, append(args, "--address", "localhost:2999")...)
		if err != nil {
			t.Fatalf("%s: %v (stderr %q)", strings.Join(args, " "), err, errOut)
		}
		return out
	}

	t.Run("status", func(t *testing.T) {
		out := cli(t, "status")
		if !strings.HasPrefix(out, "RELAY   TARGET   PENDING   OLDEST PENDING   HELD   PAUSED   DEAD LETTERS\n") {
			t.Errorf("status header:\n%s", out)
		}
		rows := tableRows(t, out)
		if len(rows) != 4 {
			t.Fatalf("status: %d rows, want 4:\n%s", len(rows), out)
		}
		for _, want := range []map[string]string{
			{"TARGET": "legacy", "PENDING": "2", "HELD": "no", "PAUSED": "no", "DEAD LETTERS": "0"},
			{"TARGET": "audit", "PENDING": "0", "OLDEST PENDING": "-", "DEAD LETTERS": "2"},
			{"TARGET": "crm", "PENDING": "0", "PAUSED": "no"},
		} {
			r := findRow(rows, "TARGET", want["TARGET"])
			for col, v := range want {
				if r == nil || r[col] != v || r["RELAY"] != "insp" {
					t.Errorf("status: %s %s is %q, want %q:\n%s", want["TARGET"], col, r[col], v, out)
				}
			}
		}
		if r := findRow(rows, "TARGET", "legacy"); r == nil || r["OLDEST PENDING"] == "-" || !strings.HasSuffix(r["OLDEST PENDING"], "s") {
			t.Errorf("status: legacy's oldest pending %q, want an age:\n%s", r["OLDEST PENDING"], out)
		}

		var ov overview
		js := cli(t, "status", "--json")
		if err := json.Unmarshal([]byte(js), &ov); err != nil || len(ov.Relays) != 1 || len(ov.Relays[0].Targets) != 4 || strings.Count(js, "\n") != 1 {
			t.Errorf("status --json: %q (%v), want the overview on one line", js, err)
		}
	})

	t.Run("pending list", func(t *testing.T) {
		out := cli(t, "pending", "list", "--relay", "insp")
		rows := tableRows(t, out)
		if len(rows) != 2 {
			t.Fatalf("pending list: %d rows, want 2:\n%s", len(rows), out)
		}
		for _, r := range rows {
			if r["TARGET"] != "legacy" || r["ATTEMPTS"] != "1" || r["LAST STATUS"] != "503" ||
				!strings.HasPrefix(r["NEXT ATTEMPT"], "in 59m") || !strings.Contains(r["LAST ERROR"], "503") || !eventIDPattern.MatchString(r["EVENT ID"]) {
				t.Errorf("pending row %v, want legacy's attempt with its 503 and a retry in an hour:\n%s", r, out)
			}
		}
		js := cli(t, "pending", "list", "--relay", "insp", "--target", "legacy", "--json", "--limit", "1", "--all")
		lines := strings.Split(strings.TrimSpace(js), "\n")
		if len(lines) != 2 {
			t.Fatalf("pending list --json: %q, want 2 lines", js)
		}
		for _, l := range lines {
			var p pendingEntry
			if err := json.Unmarshal([]byte(l), &p); err != nil || p.Target != "legacy" || p.NextAttemptAt == nil {
				t.Errorf("pending line %q: %+v, %v", l, p, err)
			}
		}
		_, errOut, err := caddyCLI(t, "pending", "list", "--relay", "insp", "--limit", "1", "--address", "localhost:2999")
		if err != nil || !strings.HasPrefix(errOut, "more: --all") {
			t.Errorf("pending list with a further page: %v, stderr %q; want a pointer to --all", err, errOut)
		}
	})

	t.Run("event", func(t *testing.T) {
		out := cli(t, "event", ids[0], "--relay", "insp")
		if !regexp.MustCompile(`^EVENT ID +`+ids[0]+`\n`).MatchString(out) || !strings.Contains(out, "\nBODY\n{\n  \"event_type\"") {
			t.Errorf("event: no id line or indented body:\n%s", out)
		}
		table := out[strings.Index(out, "TARGET"):strings.Index(out, "\nBODY")]
		rows := tableRows(t, table)
		for target, state := range map[string]string{"crm": "delivered", "legacy": "pending", "audit": "dead", "picky": "not_routed"} {
			if r := findRow(rows, "TARGET", target); r == nil || r["STATE"] != state {
				t.Errorf("event: %s is %v, want %s:\n%s", target, r, state, out)
			}
		}
		if r := findRow(rows, "TARGET", "audit"); r == nil || r["LAST STATUS"] != "400" || r["ATTEMPTS"] != "1" {
			t.Errorf("event: audit %v, want its 400 after 1 attempt", r)
		}
		var ev eventAnswer
		if err := json.Unmarshal([]byte(cli(t, "event", ids[0], "--relay", "insp", "--json")), &ev); err != nil || ev.EventID != ids[0] || len(ev.Targets) != 4 {
			t.Errorf("event --json: %+v, %v", ev, err)
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		if out := cli(t, "pause", "crm", "--relay", "insp"); out != "target crm of relay insp paused\n" {
			t.Errorf("pause: %q", out)
		}
		if r := findRow(tableRows(t, cli(t, "status")), "TARGET", "crm"); r == nil || r["PAUSED"] != "yes" {
			t.Errorf("status after pause: crm %v, want paused", r)
		}
		held, _ := postEvents(t, tester, site, "cli-held", 1)
		waitFor(t, 5*time.Second, "the held event at audit", func() bool {
			a, _ := targetStats(t, c, "insp", "audit")
			return a.DeadLetters == 3
		})
		if r := findRow(tableRows(t, cli(t, "pending", "list", "--relay", "insp", "--target", "crm")), "EVENT ID", held[0]); r == nil || r["ATTEMPTS"] != "0" {
			t.Errorf("pending at paused crm: %v, want the held event with no attempt", r)
		}
		if out := cli(t, "resume", "crm", "--relay", "insp"); out != "target crm of relay insp resumed\n" {
			t.Errorf("resume: %q", out)
		}
		crm.waitDelivered(t, 5*time.Second, held...)
	})

	t.Run("dead-letters list", func(t *testing.T) {
		out := cli(t, "dead-letters", "list", "--relay", "insp")
		rows := tableRows(t, out)
		if len(rows) != 3 {
			t.Fatalf("dead-letters list: %d rows, want 3:\n%s", len(rows), out)
		}
		for _, r := range rows {
			if r["TARGET"] != "audit" || r["LAST STATUS"] != "400" || !strings.HasSuffix(r["LAST ATTEMPT"], " ago") {
				t.Errorf("dead letter row %v", r)
			}
		}
		js := cli(t, "dead-letters", "list", "--relay", "insp", "--json")
		if n := strings.Count(js, "\n"); n != 3 || !strings.HasPrefix(js, `{"event_id":`) {
			t.Errorf("dead-letters list --json: %d lines: %q", n, js)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, args := range [][]string{
			{"status", "--address", "localhost:1"},
			{"pending", "list", "--address", "localhost:1"},
			{"event", ids[0], "--address", "localhost:1"},
			{"pause", "crm", "--address", "localhost:1"},
			{"resume", "crm", "--address", "localhost:1"},
			{"dead-letters", "list", "--address", "localhost:1"},
			{"pending", "list", "--relay", "nope", "--address", "localhost:2999"},
			{"event", strings.Repeat("ab", 16), "--relay", "insp", "--address", "localhost:2999"},
			{"event", "not-an-id", "--relay", "insp", "--address", "localhost:2999"},
			{"pause", "nope", "--relay", "insp", "--address", "localhost:2999"},
		} {
			out, errOut, err := caddyCLI(t, args...)
			if err == nil {
				t.Errorf("%s: no error, want one (exit non-zero)", strings.Join(args, " "))
				continue
			}
			if out != "" || strings.Count(errOut, "\n") != 1 || !strings.HasPrefix(errOut, "Error: ") {
				t.Errorf("%s: stdout %q, stderr %q; want one error line on stderr alone", strings.Join(args, " "), out, errOut)
			}
			want := "404"
			switch {
			case strings.Contains(strings.Join(args, " "), "localhost:1"):
				want = "connection refused"
			case args[1] == "not-an-id":
				want = "400"
			}
			if !strings.Contains(errOut, want) || strings.Contains(errOut, `{"error"`) {
				t.Errorf("%s: %q, want the message (%s) without the JSON", strings.Join(args, " "), errOut, want)
			}
		}
	})
}

// TestSimulateProgress: a progress line goes where simulate is told, and
// the command tells it only for a terminal.
func TestSimulateProgress(t *testing.T) {
	const port = 9173
	target := newTarget(t, http.StatusOK)
	startCaddy(t, siteConfig(port, fmt.Sprintf(`
	webhook_relay prog {
		auth_header X-Secret %s
		storage %s
		forward legacy %s
	}`, secret, t.TempDir(), target.URL)))
	var progress bytes.Buffer
	s, err := simulate(t.Context(), simOptions{
		URL: fmt.Sprintf("http://localhost:%d/", port), Headers: http.Header{"X-Secret": {secret}},
		Events: 5, Rate: 10, Version: "v3", Timeout: 5 * time.Second, Attempts: 2, RetryAfter: time.Millisecond,
		Progress: &progress,
	})
	if err != nil || s.Results["accepted"] != 5 {
		t.Fatalf("simulate: %v, %+v", err, s)
	}
	out := progress.String()
	if !strings.Contains(out, "\r\x1b[Kevents ") || !strings.Contains(out, "/5, requests ") || !strings.HasSuffix(out, "\r\x1b[K") {
		t.Errorf("progress output %q, want redrawn lines, erased at the end", out)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for name, out := range map[string]io.Writer{"a pipe": w, "a file": f, "a buffer": &progress} {
		if isTerminal(out) {
			t.Errorf("%s taken for a terminal", name)
		}
	}
}
