package natsstore

import (
	"time"

	"go.uber.org/zap"
)

// Config is how a relay reaches its JetStream. Every instance of one
// relay names the same URLs and stream.
type Config struct {
	// URLs of the NATS servers (nats://host:port), tried in turn.
	URLs []string
	// Stream is the name of the relay's stream; the buckets and
	// consumers it needs are named after it.
	Stream string
	// Replicas of the stream, its consumers and buckets. Default: 1.
	Replicas int

	// Credentials: at most one of CredsFile, Token, User (+ Password).
	CredsFile string
	Token     string
	User      string
	Password  string

	// TLSCA is a CA file to trust; TLSCert and TLSKey a client
	// certificate for mutual TLS.
	TLSCA   string
	TLSCert string
	TLSKey  string

	// ConnectTimeout bounds one connection attempt. Default: 5s.
	ConnectTimeout time.Duration
	// Timeout bounds how long Accept (and the other writes) wait for
	// JetStream's acknowledgement before giving up with
	// store.ErrUnavailable. Default: 2s.
	Timeout time.Duration

	// Name is the relay's name, for logs and the connection's name.
	Name string
	// Logger; nil logs nothing. Credentials are never logged.
	Logger *zap.Logger
	// Now is the clock; nil is time.Now.
	Now func() time.Time
}
