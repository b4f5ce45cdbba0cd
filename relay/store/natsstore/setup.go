package natsstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// errMismatch marks a stream or bucket whose settings are not the ones
// this config needs: the store stays down until an operator fixes it, and
// never changes it itself.
var errMismatch = errors.New("settings differ from the config")

const (
	// duplicates is the stream's Nats-Msg-Id window. It only covers
	// publishes that race (two instances, or a retry of a publish whose
	// acknowledgement was lost): dedupe itself is the keys bucket and the
	// one-message-per-subject rule.
	duplicates = 2 * time.Minute
	// markerTTL is how long a bucket keeps the marker of a key its TTL
	// removed.
	markerTTL = time.Minute
)

func (s *Store) streamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        s.n.stream,
		Description: "webhook-relay deliveries, one message per event and target",
		Subjects:    []string{s.n.stream + ".d.>"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    s.cfg.Replicas,
		Duplicates:  duplicates,
		AllowDirect: true,
	}
}

func (s *Store) deadConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:              s.n.dead,
		Description:       "webhook-relay dead letters, one per event and target",
		Subjects:          []string{s.n.dead + ".>"},
		Retention:         jetstream.LimitsPolicy,
		Storage:           jetstream.FileStorage,
		Replicas:          s.cfg.Replicas,
		MaxMsgsPerSubject: 1,
		Duplicates:        duplicates,
		AllowDirect:       true,
	}
}

func (s *Store) bucketConfig(name, what string) jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:         name,
		Description:    "webhook-relay " + what,
		Storage:        jetstream.FileStorage,
		Replicas:       s.cfg.Replicas,
		LimitMarkerTTL: markerTTL,
	}
}

// setup checks the server, then creates what is missing and checks what
// exists. Consumers are the queues' own (queue.ensure).
func (s *Store) setup(ctx context.Context) (*objects, error) {
	v := s.nc.ConnectedServerVersion()
	major, minor, ok := serverVersion(v)
	if !ok || major < 2 || major == 2 && minor < 11 {
		return nil, fmt.Errorf("nats server %s is too old: per-key TTLs need 2.11 or later", v)
	}
	if err := unanswered(ctx, func(ctx context.Context) error {
		_, err := s.js.AccountInfo(ctx)
		return err
	}); err != nil {
		return nil, fmt.Errorf("jetstream on %s: %w", s.nc.ConnectedUrlRedacted(), err)
	}
	// Five objects, each a few requests and file creations: at once.
	var obj objects
	errs := make([]error, 5)
	var wg sync.WaitGroup
	wg.Go(func() { obj.stream, errs[0] = s.ensureStream(ctx, s.streamConfig()) })
	wg.Go(func() { obj.dead, errs[1] = s.ensureStream(ctx, s.deadConfig()) })
	wg.Go(func() { obj.keys, errs[2] = s.ensureBucket(ctx, s.bucketConfig(s.n.keys, "dedupe keys")) })
	wg.Go(func() {
		obj.attempts, errs[3] = s.ensureBucket(ctx, s.bucketConfig(s.n.attempts, "delivery attempts"))
	})
	wg.Go(func() {
		if obj.keyStates, errs[4] = s.ensureBucket(ctx, s.bucketConfig(s.n.stat, "key states")); errs[4] == nil {
			errs[4] = unanswered(ctx, func(ctx context.Context) (err error) {
				obj.stateStream, err = s.js.Stream(ctx, "KV_"+s.n.stat)
				return err
			})
		}
	})
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	obj.window = obj.stream.CachedInfo().Config.Duplicates
	return &obj, nil
}

func (s *Store) ensureStream(ctx context.Context, want jetstream.StreamConfig) (jetstream.Stream, error) {
	var st jetstream.Stream
	get := func(ctx context.Context) (err error) {
		st, err = s.js.Stream(ctx, want.Name)
		return err
	}
	err := unanswered(ctx, get)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		err = unanswered(ctx, func(ctx context.Context) (err error) {
			st, err = s.js.CreateStream(ctx, want)
			return err
		})
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			// Another instance created it meanwhile, maybe otherwise.
			err = unanswered(ctx, get)
		}
		if err == nil {
			s.log.Info("created nats stream " + want.Name)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", want.Name, err)
	}
	if err := checkStream(st.CachedInfo().Config, want); err != nil {
		return nil, err
	}
	return st, nil
}

// checkStream names every setting of have that this store cannot work
// with, with the value it has and the value it needs.
func checkStream(have, want jetstream.StreamConfig) error {
	var diffs []string
	if !slices.Equal(sorted(have.Subjects), sorted(want.Subjects)) {
		diffs = append(diffs, fmt.Sprintf("subjects %q, the relay needs %q", have.Subjects, want.Subjects))
	}
	if have.Retention != want.Retention {
		diffs = append(diffs, fmt.Sprintf("retention %s, the relay needs %s", strings.ToLower(have.Retention.String()), strings.ToLower(want.Retention.String())))
	}
	if have.Replicas != want.Replicas {
		diffs = append(diffs, fmt.Sprintf("replicas %d, the config says %d", have.Replicas, want.Replicas))
	}
	if want.MaxMsgsPerSubject != 0 && have.MaxMsgsPerSubject != want.MaxMsgsPerSubject {
		diffs = append(diffs, fmt.Sprintf("max messages per subject %d, the relay needs %d", have.MaxMsgsPerSubject, want.MaxMsgsPerSubject))
	}
	if want.AllowDirect && !have.AllowDirect {
		diffs = append(diffs, "direct get off, the relay needs it on")
	}
	if len(diffs) == 0 {
		return nil
	}
	return fmt.Errorf("stream %s: %w: it has %s", want.Name, errMismatch, strings.Join(diffs, "; "))
}

func sorted(ss []string) []string {
	out := slices.Clone(ss)
	slices.Sort(out)
	return out
}

func (s *Store) ensureBucket(ctx context.Context, want jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	var kv jetstream.KeyValue
	get := func(ctx context.Context) (err error) {
		kv, err = s.js.KeyValue(ctx, want.Bucket)
		return err
	}
	err := unanswered(ctx, get)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		err = unanswered(ctx, func(ctx context.Context) (err error) {
			kv, err = s.js.CreateKeyValue(ctx, want)
			return err
		})
		if errors.Is(err, jetstream.ErrBucketExists) || errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			err = unanswered(ctx, get)
		}
		if err == nil {
			s.log.Info("created nats key-value bucket " + want.Bucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("key-value bucket %s: %w", want.Bucket, err)
	}
	var st jetstream.KeyValueStatus
	err = unanswered(ctx, func(ctx context.Context) (err error) {
		st, err = kv.Status(ctx)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("key-value bucket %s: %w", want.Bucket, err)
	}
	bs, ok := st.(*jetstream.KeyValueBucketStatus)
	if !ok {
		return nil, fmt.Errorf("key-value bucket %s: unexpected status %T", want.Bucket, st)
	}
	have := bs.StreamInfo().Config
	var diffs []string
	if have.Replicas != want.Replicas {
		diffs = append(diffs, fmt.Sprintf("replicas %d, the config says %d", have.Replicas, want.Replicas))
	}
	if !have.AllowMsgTTL {
		diffs = append(diffs, "no per-key TTL (limit marker TTL 0), the relay needs one")
	}
	if len(diffs) > 0 {
		return nil, fmt.Errorf("key-value bucket %s: %w: it has %s", want.Bucket, errMismatch, strings.Join(diffs, "; "))
	}
	return kv, nil
}

// consumerConfig is target's durable pull consumer, on its deliveries with
// an order key and without (pendingFilter). No BackOff: it would
// replace AckWait on the first redelivery, and it ignores naks; retries
// are scheduled with NakWithDelay from the relay's own attempt count.
// MaxAckPending is unlimited because a delivery waiting out its delay
// still counts against it.
func (s *Store) consumerConfig(tok string, lease time.Duration) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       tok,
		Description:   "webhook-relay deliveries to one target",
		FilterSubject: s.n.pendingFilter(tok),
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       lease,
		MaxDeliver:    -1,
		MaxAckPending: -1,
		Replicas:      s.cfg.Replicas,
	}
}
