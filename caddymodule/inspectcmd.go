package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/cobra"
)

// The subcommands that show the relays' state: status, pending list,
// event, pause and resume. Each calls one admin route and prints a table
// for people, or with --json what the route answered, for scripts.

// adminFlags are the flags of every subcommand that calls the admin API.
type adminFlags struct {
	address string
	relay   string
}

func (f *adminFlags) register(c *cobra.Command, withRelay bool) {
	c.Flags().StringVar(&f.address, "address", "", "admin API address (default: localhost:2019)")
	if withRelay {
		c.Flags().StringVar(&f.relay, "relay", "default", "the relay's name")
	}
}

func (f *adminFlags) path(rest ...string) string {
	p := "/webhook_relay/" + url.PathEscape(f.relay)
	for _, r := range rest {
		p += "/" + url.PathEscape(r)
	}
	return p
}

func statusCommand() *cobra.Command {
	var af adminFlags
	var asJSON bool
	c := &cobra.Command{
		Use:   "status [--json]",
		Short: "Show every relay and target: pending, oldest pending, held, paused, dead letters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var raw json.RawMessage
			if err := adminCall(af.address, http.MethodGet, "/webhook_relay/", nil, &raw); err != nil {
				return err
			}
			if asJSON {
				return printJSONLine(cmd.OutOrStdout(), raw)
			}
			var ov struct {
				Relays []relayOverview `json:"relays"`
			}
			if err := json.Unmarshal(raw, &ov); err != nil {
				return fmt.Errorf("reading the overview: %w", err)
			}
			return printStatus(cmd.OutOrStdout(), ov.Relays)
		},
	}
	af.register(c, false)
	c.Flags().BoolVar(&asJSON, "json", false, "print the overview route's JSON")
	return c
}

func printStatus(w io.Writer, relays []relayOverview) error {
	tw := newTable(w, "RELAY", "TARGET", "PENDING", "OLDEST PENDING", "HELD", "PAUSED", "DEAD LETTERS")
	var notes []string
	for _, r := range relays {
		if !r.StoreUp {
			notes = append(notes, fmt.Sprintf("relay %s: store down: %s", r.Name, cell(r.StoreError, 200)))
		}
		for _, t := range r.Targets {
			name := t.Name
			if !t.Configured {
				name += " (not configured)"
			}
			row(tw, r.Name, name, t.Pending, age(time.Duration(t.OldestPendingSeconds*float64(time.Second))),
				yesNo(t.Held), yesNo(t.Paused), t.DeadLetters)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(relays) == 0 {
		notes = append(notes, "no relay is running")
	}
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
	return nil
}

func pendingCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "pending list",
		Short: "List the deliveries still owed, with their attempts, last error and next attempt",
	}
	var af adminFlags
	var target string
	var limit int
	var all, asJSON bool
	list := &cobra.Command{
		Use:   "list [--relay R] [--target T] [--limit N] [--all] [--json]",
		Short: "List pending deliveries (a table; --json: one JSON object a line)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			now := time.Now()
			var tw *tabwriter.Writer
			return pages(cmd, af, "pending", target, limit, all, func(raw json.RawMessage) error {
				if asJSON {
					return printJSONLine(cmd.OutOrStdout(), raw)
				}
				var p pendingJSON
				if err := json.Unmarshal(raw, &p); err != nil {
					return fmt.Errorf("reading a pending delivery: %w", err)
				}
				if tw == nil {
					tw = newTable(cmd.OutOrStdout(), "EVENT ID", "TARGET", "ATTEMPTS", "LAST STATUS", "AGE", "NEXT ATTEMPT", "LAST ERROR")
				}
				row(tw, p.EventID, p.Target, p.Attempts, status(p.LastStatus), age(now.Sub(p.ReceivedAt)),
					until(now, p.NextAttemptAt), cell(p.LastError, 80))
				return nil
			}, func() error { return flushTable(tw) })
		},
	}
	af.register(list, true)
	list.Flags().StringVar(&target, "target", "", "only this target")
	list.Flags().IntVar(&limit, "limit", 100, "deliveries per page")
	list.Flags().BoolVar(&all, "all", false, "every page")
	list.Flags().BoolVar(&asJSON, "json", false, "one JSON object a line, as the route answers")
	c.AddCommand(list)
	return c
}

// pages calls the listing route of kind (pending or dead_letters), page
// after page with --all, and gives each entry to each; end is called
// after each page. Without --all, a further page is pointed at on stderr.
func pages(cmd *cobra.Command, af adminFlags, kind, target string, limit int, all bool, each func(json.RawMessage) error, end func() error) error {
	cursor := ""
	for {
		q := url.Values{"limit": {fmt.Sprint(limit)}}
		if target != "" {
			q.Set("target", target)
		}
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		var page struct {
			Pending     []json.RawMessage `json:"pending"`
			DeadLetters []json.RawMessage `json:"dead_letters"`
			NextCursor  string            `json:"next_cursor"`
		}
		if err := adminCall(af.address, http.MethodGet, af.path(kind)+"?"+q.Encode(), nil, &page); err != nil {
			return err
		}
		for _, raw := range append(page.Pending, page.DeadLetters...) {
			if err := each(raw); err != nil {
				return err
			}
		}
		if err := end(); err != nil {
			return err
		}
		if !all || page.NextCursor == "" {
			if page.NextCursor != "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "more: --all, or the API's cursor %s\n", page.NextCursor)
			}
			return nil
		}
		cursor = page.NextCursor
	}
}

func eventCommand() *cobra.Command {
	var af adminFlags
	var asJSON bool
	c := &cobra.Command{
		Use:   "event <event_id> [--relay R] [--json]",
		Short: "Show one event and its state at every target",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var raw json.RawMessage
			if err := adminCall(af.address, http.MethodGet, af.path("events", args[0]), nil, &raw); err != nil {
				return err
			}
			if asJSON {
				return printJSONLine(cmd.OutOrStdout(), raw)
			}
			var ev eventView
			if err := json.Unmarshal(raw, &ev); err != nil {
				return fmt.Errorf("reading the event: %w", err)
			}
			return printEvent(cmd.OutOrStdout(), &ev, time.Now())
		},
	}
	af.register(c, true)
	c.Flags().BoolVar(&asJSON, "json", false, "print the event route's JSON")
	return c
}

// eventView is what the CLI reads of the event route's answer
// (eventJSON, flat).
type eventView struct {
	EventID     string     `json:"event_id"`
	BodyKept    bool       `json:"body_kept"`
	ReceivedAt  *time.Time `json:"received_at"`
	ContentType *string    `json:"content_type"`
	Body        *string    `json:"body"`
	Targets     []struct {
		Target        string     `json:"target"`
		Configured    bool       `json:"configured"`
		State         string     `json:"state"`
		Attempts      *int       `json:"attempts"` // null: a settled state
		LastError     string     `json:"last_error"`
		LastStatus    int        `json:"last_status"`
		LastAttemptAt *time.Time `json:"last_attempt_at"`
		NextAttemptAt *time.Time `json:"next_attempt_at"`
	} `json:"targets"`
}

func printEvent(w io.Writer, ev *eventView, now time.Time) error {
	head := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintf(head, "EVENT ID\t%s\n", ev.EventID)
	if ev.ReceivedAt != nil {
		fmt.Fprintf(head, "RECEIVED\t%s (%s ago)\n", ev.ReceivedAt.Format(time.RFC3339), age(now.Sub(*ev.ReceivedAt)))
	}
	if ev.ContentType != nil && *ev.ContentType != "" {
		fmt.Fprintf(head, "CONTENT TYPE\t%s\n", cell(*ev.ContentType, 200))
	}
	if !ev.BodyKept {
		fmt.Fprintf(head, "BODY\tno longer kept: delivered everywhere, only its dedupe key is left\n")
	}
	if err := head.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	tw := newTable(w, "TARGET", "STATE", "ATTEMPTS", "LAST STATUS", "LAST ATTEMPT", "NEXT ATTEMPT", "LAST ERROR")
	for _, t := range ev.Targets {
		name := t.Target
		if !t.Configured {
			name += " (not configured)"
		}
		if t.Attempts != nil {
			last := "-"
			if t.LastAttemptAt != nil {
				last = age(now.Sub(*t.LastAttemptAt)) + " ago"
			}
			next := "-"
			if t.State == "pending" {
				next = until(now, t.NextAttemptAt)
			}
			row(tw, name, t.State, *t.Attempts, status(t.LastStatus), last, next, cell(t.LastError, 80))
			continue
		}
		row(tw, name, t.State, "-", "-", "-", "-", "")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if ev.Body != nil {
		fmt.Fprintf(w, "\nBODY\n%s\n", bodyText(*ev.Body))
	}
	return nil
}

// bodyText is a body for a terminal: indented when it is JSON, and with
// control characters shown escaped, so that a payload cannot drive the
// terminal.
func bodyText(body string) string {
	var buf bytes.Buffer
	if json.Valid([]byte(body)) && json.Indent(&buf, []byte(body), "", "  ") == nil {
		body = buf.String()
	}
	var b strings.Builder
	for _, r := range body {
		switch {
		case r == '\n' || r == '\t':
			b.WriteRune(r)
		case r == utf8.RuneError || unicode.IsControl(r):
			fmt.Fprintf(&b, "\\u%04x", r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func pauseCommand(pause bool) *cobra.Command {
	var af adminFlags
	verb, done, short := "resume", "resumed", "Let a paused target's deliveries go again, relay-wide"
	if pause {
		verb, done, short = "pause", "paused", "Stop every attempt at a target, relay-wide, until resumed (its deliveries wait; max_age still applies)"
	}
	c := &cobra.Command{
		Use:   verb + " <target> [--relay R]",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var out struct {
				Paused bool `json:"paused"`
			}
			if err := adminCall(af.address, http.MethodPost, af.path("targets", args[0], verb), struct{}{}, &out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "target %s of relay %s %s\n", args[0], af.relay, done)
			return nil
		},
	}
	af.register(c, true)
	return c
}

// newTable starts a table in the style of kubectl get: upper-case
// headers, columns three spaces apart.
func newTable(w io.Writer, headers ...string) *tabwriter.Writer {
	tw := tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	fmt.Fprintln(tw, strings.Join(headers, "\t"))
	return tw
}

func row(tw *tabwriter.Writer, cells ...any) {
	parts := make([]string, len(cells))
	for i, c := range cells {
		parts[i] = fmt.Sprint(c)
	}
	fmt.Fprintln(tw, strings.Join(parts, "\t"))
}

func flushTable(tw *tabwriter.Writer) error {
	if tw == nil {
		return nil
	}
	return tw.Flush()
}

// cell is s on one line of at most n characters, control characters and
// tabs (which would break the table) shown as spaces.
func cell(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if utf8.RuneCountInString(s) > n {
		s = string([]rune(s)[:n-1]) + "…"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func status(code int) string {
	if code == 0 {
		return "-"
	}
	return fmt.Sprint(code)
}

// age is a duration the way kubectl shows ages: two units at most.
func age(d time.Duration) string {
	switch {
	case d <= 0:
		return "-"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%dh", int(d.Hours())/24, int(d.Hours())%24)
}

// until is when a next attempt is due: "now" once due.
func until(now time.Time, at *time.Time) string {
	if at == nil {
		return "-"
	}
	if d := at.Sub(now); d > time.Second {
		return "in " + age(d)
	}
	return "now"
}

// printJSONLine prints a JSON value on one line.
func printJSONLine(w io.Writer, raw json.RawMessage) error {
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return fmt.Errorf("reading the answer: %w", err)
	}
	buf.WriteByte('\n')
	_, err := w.Write(buf.Bytes())
	return err
}
