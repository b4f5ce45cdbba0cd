package natsstore

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// Store is a store.Store on NATS JetStream, shared by every instance of a
// relay that names the same stream.
type Store struct {
	cfg   Config
	n     names
	log   *zap.Logger
	nc    *nats.Conn
	js    jetstream.JetStream
	ctx   context.Context // cancelled by Close
	stop  context.CancelFunc
	wg    sync.WaitGroup // the supervisor, fetch loops and settles
	kick  chan struct{}  // a (re)connect happened: set up again
	ncEnd chan struct{}  // closed once the connection is closed
	first chan struct{}  // closed after the first setup, whatever its outcome

	mu     sync.Mutex
	closed bool
	// up is whether setup succeeded on the current connection; reason
	// why not when it is false. upCh is closed (and replaced) whenever
	// up changes, for the fetch loops waiting on it.
	up     bool
	reason error
	upCh   chan struct{}
	logged string // the down reason last logged, so it is logged once
	obj    *objects
	queues map[string]*queue

	counts reading[store.Counts] // the gauges' counts
	limit  reading[int]          // pending events, for max_pending
}

// objects are the handles of the stream and buckets on one connection.
type objects struct {
	stream, dead              jetstream.Stream
	keys, attempts, keyStates jetstream.KeyValue
	stateStream               jetstream.Stream // keyStates' own, for its delete markers
	window                    time.Duration    // the stream's Nats-Msg-Id window
}

var streamName = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// Open connects to cfg's NATS and returns the store. It fails only on a
// config it cannot use: a server that is unreachable, or refuses the
// credentials or the certificate, gives a store that is down (Up says
// why, writes fail with store.ErrUnavailable) and comes up by itself once
// the server takes the connection and the stream checks out.
func Open(cfg Config) (*Store, error) {
	if len(cfg.URLs) == 0 {
		return nil, errors.New("nats store needs at least one server URL")
	}
	if !streamName.MatchString(cfg.Stream) {
		return nil, fmt.Errorf("nats stream name %q: only letters, digits, _ and - are allowed", cfg.Stream)
	}
	creds := 0
	for _, set := range []bool{cfg.CredsFile != "", cfg.Token != "", cfg.User != ""} {
		if set {
			creds++
		}
	}
	if creds > 1 {
		return nil, errors.New("nats store takes one of creds, token or user")
	}
	if (cfg.TLSCert == "") != (cfg.TLSKey == "") {
		return nil, errors.New("nats store needs both a client certificate and its key")
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	ctx, stop := context.WithCancel(context.Background())
	s := &Store{
		cfg:    cfg,
		n:      namesFor(cfg.Stream),
		log:    log.With(zap.String("stream", cfg.Stream)),
		ctx:    ctx,
		stop:   stop,
		kick:   make(chan struct{}, 1),
		ncEnd:  make(chan struct{}),
		first:  make(chan struct{}),
		reason: errors.New("not connected to nats yet"),
		upCh:   make(chan struct{}),
		queues: map[string]*queue{},
	}
	name := "webhook-relay"
	if cfg.Name != "" {
		name += " " + cfg.Name
	}
	opts := []nats.Option{
		nats.Name(name),
		nats.Timeout(cfg.ConnectTimeout),
		nats.RetryOnFailedConnect(true),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		// Credentials refused twice in a row would close the connection
		// for good, and the store would stay down after the server
		// takes them (a token rolled out to the servers after the
		// relays): keep trying, once a second, as for a server that is
		// away.
		nats.IgnoreAuthErrorAbort(),
		// A server that vanishes without closing the socket is noticed
		// within about 15 s, not the default 4 minutes.
		nats.PingInterval(5 * time.Second),
		nats.MaxPingsOutstanding(2),
		nats.ConnectHandler(func(*nats.Conn) { s.poke() }),
		nats.ReconnectHandler(func(*nats.Conn) { s.poke() }),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err == nil {
				err = nats.ErrConnectionClosed
			}
			s.setDown(fmt.Errorf("lost nats connection: %w", err))
			s.poke() // to follow the reconnects' errors
		}),
		nats.ClosedHandler(func(*nats.Conn) { close(s.ncEnd) }),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			s.log.Debug("nats async error", zap.Error(err))
		}),
	}
	switch {
	case cfg.CredsFile != "":
		opts = append(opts, nats.UserCredentials(cfg.CredsFile))
	case cfg.Token != "":
		opts = append(opts, nats.Token(cfg.Token))
	case cfg.User != "":
		opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
	}
	if cfg.TLSCA != "" {
		opts = append(opts, nats.RootCAs(cfg.TLSCA))
	}
	if cfg.TLSCert != "" {
		opts = append(opts, nats.ClientCert(cfg.TLSCert, cfg.TLSKey))
	}
	nc, err := nats.Connect(strings.Join(cfg.URLs, ","), opts...)
	if err != nil {
		stop()
		return nil, fmt.Errorf("connecting to nats %s: %w", redact(cfg.URLs), err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		stop()
		return nil, fmt.Errorf("opening jetstream: %w", err)
	}
	s.nc, s.js = nc, js
	if !nc.IsConnected() {
		reason := nc.LastError()
		if reason == nil {
			reason = errors.New("no server answered")
		}
		s.setDown(connectError(cfg.URLs, reason))
		s.poke() // to follow the reconnects' errors
	}
	s.wg.Add(1)
	go s.supervise()
	if nc.IsConnected() {
		// Reachable: let the first setup finish, so that a store that can
		// be up is up when Open returns.
		t := time.NewTimer(cfg.ConnectTimeout + cfg.Timeout)
		defer t.Stop()
		select {
		case <-s.first:
		case <-t.C:
		}
	}
	return s, nil
}

// connectError says why no server took the connection: refused
// credentials apart from the rest (a server away, a certificate not
// trusted), which the client's error says.
func connectError(urls []string, err error) error {
	if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) {
		return fmt.Errorf("nats %s refused the relay's credentials, retrying: %w", redact(urls), err)
	}
	return fmt.Errorf("cannot reach nats %s, retrying: %w", redact(urls), err)
}

// redact drops any user info from the URLs, for logs and errors.
func redact(urls []string) string {
	out := make([]string, len(urls))
	for i, u := range urls {
		out[i] = u
		if p, err := url.Parse(u); err == nil && p.User != nil {
			p.User = nil
			out[i] = p.String()
		}
	}
	return strings.Join(out, ",")
}

func (s *Store) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// supervise sets the stream up on every (re)connect and, while the store
// is connected but down (a stream that does not match, JetStream not
// ready), tries again every second or three; while it is not connected,
// it follows the client's reconnect errors.
func (s *Store) supervise() {
	defer s.wg.Done()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	var once sync.Once
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.kick:
		case <-retry.C:
		}
		if !s.nc.IsConnected() {
			// The client reconnects by itself. While it does, its last
			// error is that of a server that answered and turned it
			// away (credentials, TLS), which says more than "lost the
			// connection" and which Open may not have known yet.
			if err := s.nc.LastError(); err != nil {
				s.setDown(connectError(s.cfg.URLs, err))
			}
			retry.Reset(time.Second)
			continue
		}
		began := time.Now()
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.ConnectTimeout+s.cfg.Timeout)
		obj, err := s.setup(ctx)
		cancel()
		if s.ctx.Err() != nil {
			return
		}
		if err != nil {
			s.setDown(err)
			// A stream that does not match waits for an operator;
			// anything else (leaders being elected, JetStream starting)
			// passes soon, and intake is to answer again within
			// seconds: a setup a second, and at once after one that
			// waited its budget out.
			wait := max(time.Second-time.Since(began), 10*time.Millisecond)
			if errors.Is(err, errMismatch) {
				wait = 3 * time.Second
			}
			retry.Reset(wait)
		} else {
			s.setUp(obj)
		}
		once.Do(func() { close(s.first) })
	}
}

func (s *Store) setDown(reason error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	if s.up {
		close(s.upCh)
		s.upCh = make(chan struct{})
	}
	s.up, s.reason = false, reason
	if msg := reason.Error(); msg != s.logged {
		s.logged = msg
		s.log.Warn("nats store down", zap.String("servers", redact(s.cfg.URLs)), zap.Error(reason))
	}
}

func (s *Store) setUp(obj *objects) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.obj = obj
	if !s.up {
		close(s.upCh)
		s.upCh = make(chan struct{})
		s.log.Info("nats store up", zap.String("server", s.nc.ConnectedUrlRedacted()))
	}
	s.up, s.reason, s.logged = true, nil, ""
}

// Up implements store.Health.
func (s *Store) Up() (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false, store.ErrClosed
	}
	return s.up, s.reason
}

// ready returns the handles for a write, or why there are none: at once,
// so that a request never waits on a server that is known to be away.
func (s *Store) ready() (*objects, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, store.ErrClosed
	}
	if !s.up {
		return nil, fmt.Errorf("%w: %w", store.ErrUnavailable, s.reason)
	}
	return s.obj, nil
}

// bounded caps ctx at the store's Timeout.
func (s *Store) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.cfg.Timeout)
}

// Close implements store.Store: it stops the fetch loops, puts back what
// they fetched and nobody took, waits for settles under way, and drains
// the connection.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	qs := make([]*queue, 0, len(s.queues))
	for _, q := range s.queues {
		qs = append(qs, q)
	}
	close(s.upCh)
	s.mu.Unlock()
	for _, q := range qs {
		q.shut()
	}
	s.stop()
	s.wg.Wait()
	if err := s.nc.Drain(); err != nil {
		s.nc.Close()
	}
	select {
	case <-s.ncEnd:
	case <-time.After(5 * time.Second):
		s.nc.Close()
		<-s.ncEnd
	}
	return nil
}

// serverVersion parses "2.11.3" into comparable parts.
func serverVersion(v string) (major, minor int, ok bool) {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(strings.TrimLeft(parts[1], "v"))
	return major, minor, err1 == nil && err2 == nil
}

var (
	_ store.Store  = (*Store)(nil)
	_ store.Health = (*Store)(nil)
)
