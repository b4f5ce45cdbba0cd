package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "webhook-relay",
		Usage: "simulate|status|pending|event|pause|resume|dead-letters|migrate|transform ...",
		Short: "Simulates OkHi's webhooks, shows and steers the relays, manages dead letters, moves a bbolt store to NATS, previews a target's request",
		Long: `
simulate sends OkHi-shaped events to a relay the way OkHi does (15 s
timeout, retries with exponential backoff, so duplicates happen) and
prints what came back; on a terminal, with a live progress line.

status, pending list, event <event_id>, pause <target>, resume <target>
and dead-letters list|replay|delete call the relay's routes on Caddy's
admin endpoint (--address, default localhost:2019): tables for people,
--json for scripts. When the endpoint cannot be reached or answers an
error, they print one line on stderr and exit non-zero.

migrate copies a bbolt store (pending deliveries with their attempts,
dead letters, unexpired dedupe keys) into a NATS JetStream stream, for
several instances sharing one relay; it can be run again without
duplicating anything.

transform prints the request a target would get for an event (method,
URL, headers with secrets masked, body), sending nothing.
`,
		CobraFunc: addSubcommands,
	})
}

// addSubcommands gives cmd, caddy's webhook-relay command, its
// subcommands.
func addSubcommands(cmd *cobra.Command) {
	cmd.AddCommand(simulateCommand(), statusCommand(), pendingCommand(), eventCommand(),
		pauseCommand(true), pauseCommand(false), deadLettersCommand(), migrateCommand(), transformCommand())
}

func simulateCommand() *cobra.Command {
	var o simOptions
	var headers []string
	c := &cobra.Command{
		Use:   "simulate --url URL --header NAME:VALUE [--events N] [--rate R] [--duplicates F] [--version v2|v3]",
		Short: "Send OkHi-shaped events the way OkHi does, and print a summary",
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Headers = http.Header{}
			for _, h := range headers {
				name, value, ok := strings.Cut(h, ":")
				if !ok || strings.TrimSpace(name) == "" {
					return fmt.Errorf("--header %q: want NAME:VALUE", h)
				}
				o.Headers.Add(strings.TrimSpace(name), strings.TrimSpace(value))
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
			defer stop()
			if isTerminal(cmd.OutOrStdout()) {
				o.Progress = cmd.OutOrStdout()
			}
			s, err := simulate(ctx, o)
			if s != nil {
				s.report(cmd.OutOrStdout())
			}
			if err != nil {
				return err
			}
			if s.GaveUp > 0 {
				return fmt.Errorf("%d events never got a 2xx", s.GaveUp)
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&o.URL, "url", "", "the relay's URL")
	f.StringArrayVar(&headers, "header", nil, "a header to send, NAME:VALUE (repeatable): the auth header")
	f.IntVar(&o.Events, "events", 100, "distinct events to send")
	f.Float64Var(&o.Rate, "rate", 10, "sends per second")
	f.Float64Var(&o.Duplicates, "duplicates", 0.1, "share of sends that re-send an earlier event's exact bytes")
	f.StringVar(&o.Version, "version", "v2", "payload version: v2 or v3")
	f.DurationVar(&o.Timeout, "timeout", 15*time.Second, "how long to wait for an answer, as OkHi does")
	f.IntVar(&o.Attempts, "attempts", 5, "attempts per send before giving up")
	f.DurationVar(&o.RetryAfter, "retry-wait", time.Second, "first retry delay, doubled after each failure")
	return c
}

func deadLettersCommand() *cobra.Command {
	var address, relayName, target string
	c := &cobra.Command{
		Use:   "dead-letters list|replay|delete",
		Short: "List, replay or delete the relay's dead letters through the admin API",
	}
	pf := c.PersistentFlags()
	pf.StringVar(&address, "address", "", "admin API address (default: localhost:2019)")
	pf.StringVar(&relayName, "relay", "default", "the relay's name")
	pf.StringVar(&target, "target", "", "only this target")

	var limit int
	var all, asJSON bool
	list := &cobra.Command{
		Use:   "list [--limit N] [--all] [--json]",
		Short: "List dead letters (a table; --json: one JSON object a line)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			now := time.Now()
			var tw *tabwriter.Writer
			af := adminFlags{address: address, relay: relayName}
			return pages(cmd, af, "dead_letters", target, limit, all, func(raw json.RawMessage) error {
				if asJSON {
					return printJSONLine(cmd.OutOrStdout(), raw)
				}
				var d deadLetterJSON
				if err := json.Unmarshal(raw, &d); err != nil {
					return fmt.Errorf("reading a dead letter: %w", err)
				}
				if tw == nil {
					tw = newTable(cmd.OutOrStdout(), "EVENT ID", "TARGET", "ATTEMPTS", "LAST STATUS", "AGE", "LAST ATTEMPT", "LAST ERROR")
				}
				last := "-"
				if d.LastAttemptAt != nil {
					last = age(now.Sub(*d.LastAttemptAt)) + " ago"
				}
				row(tw, d.EventID, d.Target, d.Attempts, status(d.LastStatus), age(now.Sub(d.ReceivedAt)), last, cell(d.LastError, 80))
				return nil
			}, func() error { return flushTable(tw) })
		},
	}
	list.Flags().IntVar(&limit, "limit", 100, "dead letters per page")
	list.Flags().BoolVar(&all, "all", false, "every page")
	list.Flags().BoolVar(&asJSON, "json", false, "one JSON object a line, as the route answers")

	var ids []string
	replay := &cobra.Command{
		Use:   "replay [--event-id ID ...] [--target T]",
		Short: "Move dead letters back to pending with a fresh attempt budget (all of them without --event-id)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			body := map[string]any{}
			if len(ids) > 0 {
				body["event_ids"] = ids
			}
			if target != "" {
				body["target"] = target
			}
			var out struct {
				Replayed int `json:"replayed"`
			}
			if err := adminCall(address, http.MethodPost, deadLettersPath(relayName)+"/replay", body, &out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "replayed %d\n", out.Replayed)
			return nil
		},
	}
	replay.Flags().StringArrayVar(&ids, "event-id", nil, "an event id (repeatable)")

	var deleteID string
	del := &cobra.Command{
		Use:   "delete --event-id ID [--target T]",
		Short: "Delete an event's dead letters (at every target without --target)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if deleteID == "" {
				return fmt.Errorf("--event-id is required")
			}
			uri := deadLettersPath(relayName) + "/" + url.PathEscape(deleteID)
			if target != "" {
				uri += "?target=" + url.QueryEscape(target)
			}
			var out struct {
				Deleted int `json:"deleted"`
			}
			if err := adminCall(address, http.MethodDelete, uri, nil, &out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %d\n", out.Deleted)
			return nil
		},
	}
	del.Flags().StringVar(&deleteID, "event-id", "", "the event id")

	c.AddCommand(list, replay, del)
	return c
}

func deadLettersPath(name string) string {
	return "/webhook_relay/" + url.PathEscape(name) + "/dead_letters"
}

// adminCall makes one admin API request and decodes its JSON answer. Its
// errors are one line, naming the request and what went wrong (the API's
// own message, when it answered one).
func adminCall(address, method, uri string, in, out any) error {
	if address == "" {
		address = caddy.DefaultAdminListen
	}
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	resp, err := caddycmd.AdminAPIRequest(address, method, uri, nil, body)
	if err != nil {
		msg := adminMessage(err.Error())
		if rest, ok := strings.CutPrefix(msg, "performing request: "); ok {
			// The request's URL, quoted, then why it failed.
			if _, why, ok := strings.Cut(rest, `": `); ok {
				rest = why
			}
			return fmt.Errorf("cannot reach Caddy's admin endpoint at %s: %s", address, rest)
		}
		return fmt.Errorf("%s %s at %s: %s", method, uri, address, strings.TrimPrefix(msg, "caddy responded with error: "))
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s %s at %s: %s: %s", method, uri, address, resp.Status, adminMessage(string(b)))
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s at %s: reading the answer: %w", method, uri, address, err)
	}
	return nil
}

// adminMessage makes an admin API error one line: the message of a JSON
// error answer ({"error":"..."}) in place of the JSON, whitespace
// collapsed.
func adminMessage(msg string) string {
	if i := strings.IndexByte(msg, '{'); i >= 0 {
		var answer struct {
			Error string `json:"error"`
		}
		if json.Unmarshal([]byte(strings.TrimSpace(msg[i:])), &answer) == nil && answer.Error != "" {
			msg = msg[:i] + answer.Error
		}
	}
	return strings.Join(strings.Fields(msg), " ")
}
