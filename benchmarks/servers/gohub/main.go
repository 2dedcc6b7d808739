// Reference competitor for the rooms benchmark: a Go gorilla/websocket hub with rooms.
//
// Implements only the subset of trioserve's protocol the benchmark uses:
// subscribe and publish on /ws, one JSON object per text frame, per-topic
// offsets, and GET /healthz. It is the idiomatic gorilla design: a reader
// goroutine per connection, a writer goroutine draining a buffered channel,
// each publication encoded once (websocket.PreparedMessage) and handed to
// every subscriber of its room. A subscriber whose buffer is full is
// dropped, as in gorilla's chat example.
//
// Build without network access, in GOPATH mode against Debian's packages
// (benchmarks/servers/go_hub.py does this):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o gohub .
package main

import (
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"sync"

	"github.com/gorilla/websocket"
)

const sendBuffer = 8192

type client struct {
	conn *websocket.Conn
	send chan *websocket.PreparedMessage
	once sync.Once
}

type hub struct {
	mu      sync.Mutex
	rooms   map[string]map[*client]struct{}
	offsets map[string]int64
}

type request struct {
	Op    string          `json:"op"`
	Topic *string         `json:"topic"`
	ID    json.RawMessage `json:"id"`
	Data  json.RawMessage `json:"data"`
}

type pub struct {
	Op     string          `json:"op"`
	Topic  string          `json:"topic"`
	Offset int64           `json:"offset"`
	Data   json.RawMessage `json:"data"`
}

var upgrader = websocket.Upgrader{ReadBufferSize: 4096, WriteBufferSize: 4096,
	CheckOrigin: func(r *http.Request) bool { return true }}

func (c *client) enqueue(m *websocket.PreparedMessage) {
	select {
	case c.send <- m:
	default:
		c.close() // too slow: drop it rather than stall the room
	}
}

func (c *client) close() {
	c.once.Do(func() { c.conn.Close() })
}

func (c *client) writer() {
	for m := range c.send {
		if err := c.conn.WritePreparedMessage(m); err != nil {
			c.close()
			for range c.send { // drain so publishers never block
			}
			return
		}
	}
}

func reply(v any) *websocket.PreparedMessage {
	b, _ := json.Marshal(v)
	m, _ := websocket.NewPreparedMessage(websocket.TextMessage, b)
	return m
}

func (h *hub) serve(w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	c := &client{conn: conn, send: make(chan *websocket.PreparedMessage, sendBuffer)}
	go c.writer()
	subscribed := map[string]struct{}{}
	defer func() {
		h.mu.Lock()
		for t := range subscribed {
			delete(h.rooms[t], c)
		}
		h.mu.Unlock()
		c.close()
		close(c.send)
	}()
	for {
		_, raw, err := conn.ReadMessage()
		if err != nil {
			return
		}
		var req request
		if json.Unmarshal(raw, &req) != nil || req.Topic == nil {
			c.enqueue(reply(map[string]any{"id": req.ID, "ok": false, "error": "bad request"}))
			continue
		}
		topic := *req.Topic
		switch req.Op {
		case "subscribe":
			h.mu.Lock()
			room := h.rooms[topic]
			if room == nil {
				room = map[*client]struct{}{}
				h.rooms[topic] = room
			}
			room[c] = struct{}{}
			h.mu.Unlock()
			subscribed[topic] = struct{}{}
			c.enqueue(reply(map[string]any{"id": req.ID, "ok": true, "topic": topic}))
		case "publish":
			h.mu.Lock()
			h.offsets[topic]++
			offset := h.offsets[topic]
			room := h.rooms[topic]
			// Encoded once; every subscriber's writer sends the same frame.
			m := reply(pub{"pub", topic, offset, req.Data})
			for s := range room {
				s.enqueue(m)
			}
			n := len(room)
			h.mu.Unlock()
			c.enqueue(reply(map[string]any{"id": req.ID, "ok": true, "offset": offset, "subscribers": n}))
		default:
			c.enqueue(reply(map[string]any{"id": req.ID, "ok": false, "error": "unsupported op"}))
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8765", "listen address")
	flag.Parse()
	h := &hub{rooms: map[string]map[*client]struct{}{}, offsets: map[string]int64{}}
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	http.HandleFunc("/ws", h.serve)
	log.Fatal(http.ListenAndServe(*addr, nil))
}
