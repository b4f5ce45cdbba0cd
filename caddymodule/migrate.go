package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store/natsstore"
)

// migrateFlags are the migrate command's flags.
type migrateFlags struct {
	from, to, stream string
	replicas         int
	creds, token     string
	user, password   string
	tlsCA            string
	dryRun           bool
}

func migrateCommand() *cobra.Command {
	var f migrateFlags
	c := &cobra.Command{
		Use:   "migrate --from <bbolt dir> --to <nats url>[,<url>...] --stream <name> [--replicas N] [--creds F | --token T | --user U --password P] [--tls-ca F] [--dry-run]",
		Short: "Copy a relay's bbolt store into its NATS JetStream stream",
		Long: `
migrate copies what a relay left in its bbolt store (the relay.db in
--from) into the stream its NATS storage names: every pending delivery
with its attempts and schedule, every dead letter, and every dedupe key
that has not expired, with its expiry. The bbolt store is not changed.

Stop the Caddy that used the directory first: a file still in use is
refused. The relays on NATS may run meanwhile; they take the deliveries
as they arrive, each not before its next attempt. --stream, --replicas
and the credentials are those of the relay's "storage nats" block; the
stream and its buckets are created if missing.

It can be run again, after an interruption or days later, and copies
only what is missing. Each event is copied oldest first, its dedupe key
last, and an event whose key the stream has is skipped whole (counted as
already there): so a delivery made from NATS between two runs is not
made again. An event without a key, or whose key has expired, gets one
that is already expired, which marks it copied for 30 days and never
counts as seen. The one exception is the event a run was copying when it
stopped: a delivery of it that NATS made before the next run may be made
again (targets can dedupe by the event id). Once a run finds everything
already there, retire the bbolt directory.

--dry-run reads the bbolt store and prints what a run would copy, without
connecting to NATS.
`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
			defer stop()
			return runMigrate(ctx, f, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := c.Flags()
	fl.StringVar(&f.from, "from", "", "the relay's bbolt storage directory (holding relay.db)")
	fl.StringVar(&f.to, "to", "", "NATS server URLs, comma-separated")
	fl.StringVar(&f.stream, "stream", "", "the relay's stream, as its storage nats block names it (or its default WEBHOOK_RELAY_<NAME>)")
	fl.IntVar(&f.replicas, "replicas", 1, "replicas of the stream and its buckets, as the storage nats block says")
	fl.StringVar(&f.creds, "creds", "", "NATS credentials file")
	fl.StringVar(&f.token, "token", "", "NATS token (visible to other users in the process list: prefer --creds)")
	fl.StringVar(&f.user, "user", "", "NATS user name, with --password")
	fl.StringVar(&f.password, "password", "", "NATS password (visible to other users in the process list: prefer --creds)")
	fl.StringVar(&f.tlsCA, "tls-ca", "", "PEM file of the CA that signed the NATS servers' certificates")
	fl.BoolVar(&f.dryRun, "dry-run", false, "print what would be copied, touching nothing")
	return c
}

func runMigrate(ctx context.Context, f migrateFlags, stdout, stderr io.Writer) error {
	if f.from == "" {
		return errors.New("--from is required: the relay's bbolt storage directory")
	}
	cfg, err := f.natsConfig()
	if err != nil && !f.dryRun {
		return err
	}
	src, err := store.OpenBoltExisting(filepath.Join(f.from, "relay.db"), storeLockTimeout)
	if err != nil {
		return err
	}
	defer src.Close()

	var dst *natsstore.Store
	if !f.dryRun {
		if dst, err = natsstore.Open(cfg); err != nil {
			return err
		}
		defer dst.Close()
		if up, why := dst.Up(); !up {
			return fmt.Errorf("nats store: %w", why)
		}
	}
	// Progress on stderr now and then: a large store takes a while.
	last := time.Now()
	opts := natsstore.MigrateOptions{DryRun: f.dryRun, Progress: func(s natsstore.MigrateSummary) {
		if time.Since(last) >= 2*time.Second {
			last = time.Now()
			fmt.Fprintf(stderr, "... %d deliveries, %d dead letters, %d keys so far\n",
				s.Pending+s.PendingSkipped, s.Dead+s.DeadSkipped, s.Keys+s.KeysSkipped+s.KeysExpired)
		}
	}}
	sum, err := natsstore.Migrate(ctx, src, dst, opts)
	printMigrateSummary(stdout, sum, f.dryRun)
	if err != nil {
		return fmt.Errorf("migrate stopped (run it again to copy the rest): %w", err)
	}
	return nil
}

// natsConfig checks the NATS flags as the storage nats block is checked.
func (f migrateFlags) natsConfig() (natsstore.Config, error) {
	n := NATSStorage{
		Stream:   f.stream,
		Replicas: f.replicas,
		Creds:    f.creds,
		Token:    f.token,
		User:     f.user,
		Password: f.password,
		TLSCA:    f.tlsCA,
	}
	for _, u := range strings.Split(f.to, ",") {
		if u = strings.TrimSpace(u); u != "" {
			n.URLs = append(n.URLs, u)
		}
	}
	if len(n.URLs) == 0 {
		return natsstore.Config{}, errors.New("--to is required: the NATS server URL(s)")
	}
	if f.stream == "" {
		return natsstore.Config{}, errors.New("--stream is required: the relay's stream")
	}
	if f.replicas < 1 {
		return natsstore.Config{}, fmt.Errorf("--replicas must be 1 to %d, not %d", maxReplicas, f.replicas)
	}
	if err := n.check(); err != nil {
		return natsstore.Config{}, err
	}
	return natsstore.Config{
		URLs:      n.URLs,
		Stream:    n.Stream,
		Replicas:  n.Replicas,
		CredsFile: n.Creds,
		Token:     n.Token,
		User:      n.User,
		Password:  n.Password,
		TLSCA:     n.TLSCA,
		Name:      "migrate",
	}, nil
}

func printMigrateSummary(w io.Writer, s natsstore.MigrateSummary, dry bool) {
	if dry {
		fmt.Fprintf(w, "would copy %d pending deliveries, %d dead letters, %d dedupe keys (%d expired, not copied)\n",
			s.Pending, s.Dead, s.Keys, s.KeysExpired)
		return
	}
	fmt.Fprintf(w, "pending deliveries: %d copied, %d already there\n", s.Pending, s.PendingSkipped)
	fmt.Fprintf(w, "dead letters:       %d copied, %d already there\n", s.Dead, s.DeadSkipped)
	fmt.Fprintf(w, "dedupe keys:        %d copied, %d already there, %d expired (not copied)\n", s.Keys, s.KeysSkipped, s.KeysExpired)
}
