package relay

import "errors"

// Sentinel errors of Engine.Receive.
var (
	// ErrUnavailable: the store cannot take the event (closed, failing).
	ErrUnavailable = errors.New("relay unavailable")
	// ErrTooLarge: the store can never hold the event (answer 413).
	ErrTooLarge = errors.New("event too large for the relay's store")
	// ErrFull: max_pending events are already owed to targets.
	ErrFull = errors.New("relay full: max_pending reached")
)
