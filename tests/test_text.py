from edge_genarm.text import TextStream


def feed(stream, chunks):
    out = [stream.push(c) for c in chunks]
    return out, stream.flush()


def test_utf8_split_across_tokens_is_held_until_whole():
    s = TextStream()
    b = "é🚀".encode()
    out, tail = feed(s, [b[:1], b[1:3], b[3:]])
    assert out == ["", "é", "🚀"] and tail == ""


def test_stop_string_split_across_tokens_is_cut():
    s = TextStream(["<END>"])
    out, tail = feed(s, [b"Hello <E", b"N", b"D> more"])
    assert "".join(out) + tail == "Hello "
    assert out[0] == "Hello " and s.stopped


def test_partial_stop_is_released_when_it_cannot_match():
    s = TextStream(["STOP"])
    out, tail = feed(s, [b"a ST", b"Ox", b"y"])
    assert out == ["a ", "STOx", "y"] and tail == "" and not s.stopped


def test_held_partial_stop_is_flushed_at_the_end():
    s = TextStream(["STOP"])
    out, tail = feed(s, [b"abc ST"])
    assert out == ["abc "] and tail == "ST"


def test_earliest_of_several_stops_wins():
    s = TextStream(["world", "lo"])
    out, tail = feed(s, [b"hello world"])
    assert "".join(out) + tail == "hel"
