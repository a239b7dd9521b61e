/// The `--help` text of a command, made from its spec:
///
///     relora eval: mean next-token loss and perplexity of a model on a token file
///
///     Usage: relora eval --model DIR|FILE.gguf --data TOKENS.npy --seq-len N [--batch B] [--json] ...
///
///     <discussion>
///
///     Commands:            (a command with subcommands)
///       train              ...
///
///     Options:
///       --batch B          windows per forward pass (default: 8)
///       ...
///       -h, --help         print this help and exit
///
///     Example:
///       relora eval --model runs/mine/hf --data data/mine/val.npy --seq-len 128
extension CommandSpec {
    /// Lines are wrapped at this many columns.
    public static let textWidth = 110

    public var usage: String {
        var parts = ["\(name): \(summary)"]
        let lines = synopsis.isEmpty ? [generatedSynopsis] : synopsis
        parts.append(lines.enumerated().map { i, line in
            Self.wrapSynopsis((i == 0 ? "Usage: " : "       ") + name, line, indent: 7 + name.count + 1)
        }.joined(separator: "\n"))
        if !discussion.isEmpty { parts.append(Self.wrap(discussion, indent: 0)) }
        if !subcommands.isEmpty {
            parts.append("Commands:\n" + Self.commandTable(subcommands, under: name)
                         + "\n\nRun `\(name) <command> --help` for a command's options.")
        }
        let optionRows = options.map { o -> (String, String) in
            var notes: [String] = []
            if !o.choices.isEmpty && o.placeholder != o.choices.joined(separator: "|") {
                notes.append("one of \(o.choices.joined(separator: ", "))")
            }
            if let d = o.defaultValue { notes.append("default: \(d)") }
            if o.arity == .repeated { notes.append("repeatable") }
            return (o.arity == .flag ? "--\(o.name)" : "--\(o.name) \(o.placeholder)",
                    o.help + (notes.isEmpty ? "" : " (\(notes.joined(separator: "; ")))"))
        } + [("-h, --help", "print this help and exit")]
        parts.append("Options:\n" + Self.table(optionRows))
        if !examples.isEmpty {
            parts.append((examples.count == 1 ? "Example:\n" : "Examples:\n") + examples.map { "  " + $0 }.joined(separator: "\n"))
        }
        return parts.joined(separator: "\n\n")
    }

    /// `head` and the synopsis `line`, broken between its words where it is too long; a bracketed group
    /// (`[--device cpu|cuda]`) is one word.
    static func wrapSynopsis(_ head: String, _ line: String, indent: Int) -> String {
        var groups: [String] = []
        var depth = 0
        for word in line.split(separator: " ") {
            if depth > 0 { groups[groups.count - 1] += " " + word } else { groups.append(String(word)) }
            depth += word.filter { $0 == "[" }.count - word.filter { $0 == "]" }.count
        }
        var lines: [String] = []
        var current = head
        for group in groups {
            if current.count + 1 + group.count > textWidth && current.count > indent {
                lines.append(current)
                current = String(repeating: " ", count: indent - 1)
            }
            current += " " + group
        }
        lines.append(current)
        return lines.joined(separator: "\n")
    }

    /// "RUN_DIR [RUN_DIR ...] --out DIR [--json]": positionals, then the required options, then the others.
    var generatedSynopsis: String {
        var words: [String] = []
        if let p = positionals {
            switch (p.count.lowerBound, p.count.upperBound) {
            case (0, 1): words.append("[\(p.placeholder)]")
            case (0, _): words.append("[\(p.placeholder) ...]")
            case (let lo, let hi): words += Array(repeating: p.placeholder, count: lo) + (hi > lo ? ["[\(p.placeholder) ...]"] : [])
            }
        }
        for o in options.filter(\.required) + options.filter({ !$0.required }) {
            let word = o.arity == .flag ? "--\(o.name)" : "--\(o.name) \(o.placeholder)"
            switch (o.arity, o.required) {
            case (.repeated, true): words += [word, "[\(word) ...]"]
            case (.repeated, false): words.append("[\(word) ...]")
            case (_, true): words.append(word)
            case (_, false): words.append("[\(word)]")
            }
        }
        return words.joined(separator: " ")
    }

    /// One line per command (a command with subcommands: one per subcommand), its words after `parent`
    /// and its summary: what `relora --help` lists.
    public static func commandTable(_ commands: [CommandSpec], under parent: String) -> String {
        let leaves = commands.flatMap { $0.subcommands.isEmpty ? [$0] : $0.subcommands }
        return table(leaves.map { (String($0.name.dropFirst(parent.count + 1)), $0.summary) })
    }

    /// Two columns: the left ones padded to the widest (at most 24 characters; a longer one puts its
    /// text on the next line), the right ones wrapped, each of their lines indented to the column.
    static func table(_ rows: [(String, String)]) -> String {
        let column = min(24, rows.map(\.0.count).max() ?? 0) + 4
        let margin = String(repeating: " ", count: column)
        return rows.map { left, right in
            let head = "  " + left
            let body = right.split(separator: "\n", omittingEmptySubsequences: false)
                .map { wrap(margin + $0, indent: column) }.joined(separator: "\n")
            return head.count + 2 <= column ? head + body.dropFirst(head.count) : head + "\n" + body
        }.joined(separator: "\n")
    }

    /// `text` with every line longer than `textWidth` broken at spaces, continuation lines indented by
    /// `indent` spaces (or as deep as the line itself is indented). Lines that fit are kept as written.
    static func wrap(_ text: String, indent: Int) -> String {
        text.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            guard line.count > textWidth else { return String(line) }
            let lead = line.prefix { $0 == " " }
            let continuation = String(repeating: " ", count: max(indent, lead.count))
            var lines: [String] = []
            var current = String(lead)
            var hasWord = false
            for word in line.dropFirst(lead.count).split(separator: " ") {
                if hasWord && current.count + 1 + word.count > textWidth {
                    lines.append(current)
                    current = continuation + word
                } else {
                    current += (hasWord ? " " : "") + word
                }
                hasWord = true
            }
            lines.append(current)
            return lines.joined(separator: "\n")
        }.joined(separator: "\n")
    }
}
