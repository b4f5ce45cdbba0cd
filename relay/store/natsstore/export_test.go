package natsstore

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// What the engine tests (package natsstore_test) use of this package's
// test helpers.

// TestServer is an embedded JetStream server on its own files and port.
type TestServer = natsServer

// StartTestServer starts one that the test's cleanup stops.
func StartTestServer(t testing.TB) *TestServer { return startNATS(t) }

// URL is the server's client URL.
func (ns *natsServer) URL() string { return ns.url() }

// Stop shuts the server down; Start starts it again on its files and port.
func (ns *natsServer) Stop()  { ns.stop() }
func (ns *natsServer) Start() { ns.start() }

// CreateStream creates the deliveries stream a store of stream needs,
// with window as its Nats-Msg-Id window, before any store does.
func CreateStream(t testing.TB, url, stream string, window time.Duration) {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	s := &Store{cfg: Config{Replicas: 1}, n: namesFor(stream)}
	sc := s.streamConfig()
	sc.Duplicates = window
	if _, err := js.CreateStream(t.Context(), sc); err != nil {
		t.Fatal(err)
	}
}
