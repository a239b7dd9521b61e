import ReLoRACore

/// What `CommandSpec.parse` found: a request for the usage text, or the command's arguments.
public enum ParseResult: Sendable {
    case help
    case arguments(ParsedArguments)
}

extension CommandSpec {
    /// Parses `args` (the words after `name`) by the grammar in `CommandSpec`'s comment. Checks everything
    /// the spec says (known options, values present, no repeats, choices, required options, the number
    /// of positionals); numbers are checked when read (`ParsedArguments.int`), so a message can say what
    /// range the command needs. Throws the first problem as one `ReLoRAError.usage` sentence; `--help`
    /// anywhere wins over any problem.
    public func parse(_ args: [String]) throws -> ParseResult {
        if args.isEmpty && helpWhenEmpty { return .help }
        var given: [String: [String]] = [:]
        var positional: [String] = []
        var firstProblem: String?
        var wantsHelp = false
        func problem(_ message: String) { if firstProblem == nil { firstProblem = message } }

        var i = 0
        var optionsEnded = false
        while i < args.count {
            let arg = args[i]
            i += 1
            if optionsEnded || !Self.looksLikeOption(arg) {
                positional.append(arg)
                continue
            }
            if arg == "--" { optionsEnded = true; continue }
            if arg == "-h" || arg == "--help" { wantsHelp = true; continue }
            guard arg.hasPrefix("--") else { problem("unknown option \(arg)"); continue }
            let body = arg.dropFirst(2)
            let name = String(body.prefix { $0 != "=" })
            let inline = body.firstIndex(of: "=").map { String(body[body.index(after: $0)...]) }
            guard let spec = option(name) else {
                problem("unknown option --\(name)" + (closestOption(to: name).map { " (did you mean --\($0)?)" } ?? ""))
                continue
            }
            let value: String
            switch spec.arity {
            case .flag:
                guard inline == nil else { problem("--\(name) is a flag and takes no value"); continue }
                value = ""
            case .single, .repeated:
                if let inline {
                    value = inline
                } else if i < args.count, !isOwnOption(args[i]) {
                    value = args[i]
                    i += 1
                } else {
                    problem("--\(name) needs a value: --\(name) \(spec.placeholder)")
                    continue
                }
            }
            if spec.arity != .repeated, let previous = given[name] {
                problem(spec.arity == .flag ? "--\(name) is given twice; give it once"
                        : "--\(name) is given twice ('\(previous[0])', then '\(value)'); give it once")
                continue
            }
            if !spec.choices.isEmpty && !spec.choices.contains(value) {
                problem("--\(name) \(value) is not supported; use \(Self.alternatives(spec.choices))")
                continue
            }
            given[name, default: []].append(value)
        }
        if wantsHelp { return .help }
        if let firstProblem { throw usageError(firstProblem) }

        for spec in options where spec.required && given[spec.name] == nil {
            throw usageError("missing required option --\(spec.name) \(spec.placeholder)")
        }
        let allowed = positionals?.count ?? 0...0
        if positional.count > allowed.upperBound {
            let stray = positional[allowed.upperBound]
            throw usageError(allowed.upperBound == 0 ? "unexpected argument '\(stray)': it takes no positional arguments"
                             : "unexpected argument '\(stray)': give \(positionalCount)")
        }
        if positional.count < allowed.lowerBound {
            throw usageError("missing \(positionals!.placeholder): give \(positionalCount)")
        }
        return .arguments(ParsedArguments(command: self, positional: positional, given: given))
    }

    /// `parse`, printing the usage text to stdout when asked for it (then nil: the command is done).
    public func parseOrPrintHelp(_ args: [String]) throws -> ParsedArguments? {
        switch try parse(args) {
        case .help:
            print(usage)
            return nil
        case .arguments(let a):
            return a
        }
    }

    /// "-x", "--name", "--name=v", "--"; not "-" (stdin, by convention) and not a negative number.
    static func looksLikeOption(_ arg: String) -> Bool {
        arg.hasPrefix("-") && arg.count > 1 && Double(arg) == nil
    }

    /// Whether `arg` is one of this command's options (or help, or `--`), which the word before it
    /// cannot take as its value: `--seq-len --json` is a missing value, `--temperature -1` is not.
    func isOwnOption(_ arg: String) -> Bool {
        if arg == "-h" || arg == "--help" || arg == "--" { return true }
        guard arg.hasPrefix("--") else { return false }
        return option(String(arg.dropFirst(2).prefix { $0 != "=" })) != nil
    }

    /// The declared option within two edits of `name` (a typo), if exactly one is nearest.
    func closestOption(to name: String) -> String? {
        let scored = options.map { ($0.name, Self.editDistance(name, $0.name)) }.filter { $0.1 <= 2 }
        guard let best = scored.map(\.1).min() else { return nil }
        let nearest = scored.filter { $0.1 == best }
        return nearest.count == 1 ? nearest[0].0 : nil
    }

    /// "one RECIPE.json", "at least one RUN_DIR", "at most one CONFIG.json".
    var positionalCount: String {
        guard let p = positionals else { return "no positional arguments" }
        switch (p.count.lowerBound, p.count.upperBound) {
        case (let lo, let hi) where lo == hi: return "\(lo == 1 ? "one" : String(lo)) \(p.placeholder)"
        case (0, 1): return "at most one \(p.placeholder)"
        case (let lo, PositionalSpec.unbounded): return "at least \(lo == 1 ? "one" : String(lo)) \(p.placeholder)"
        case (let lo, let hi): return "\(lo) to \(hi) \(p.placeholder)"
        }
    }

    /// "a, b or c".
    static func alternatives(_ words: [String]) -> String {
        words.count <= 1 ? words.joined() : words.dropLast().joined(separator: ", ") + " or " + words.last!
    }

    /// Levenshtein distance (insertions, deletions, substitutions), row by row.
    static func editDistance(_ a: String, _ b: String) -> Int {
        let b = Array(b)
        var previous = Array(0...b.count)
        for (i, ca) in a.enumerated() {
            var current = [i + 1]
            for (j, cb) in b.enumerated() {
                current.append(min(previous[j + 1] + 1, current[j] + 1, previous[j] + (ca == cb ? 0 : 1)))
            }
            previous = current
        }
        return previous[b.count]
    }
}

/// A command's parsed arguments. Reading an option the command did not declare is a programming error
/// (it traps); everything a user can get wrong throws `ReLoRAError.usage` naming the command and option.
public struct ParsedArguments: Sendable {
    public let command: CommandSpec
    /// In the order given.
    public let positional: [String]
    /// Option name -> the values given, in order ("" for a flag).
    let given: [String: [String]]

    init(command: CommandSpec, positional: [String], given: [String: [String]]) {
        self.command = command
        self.positional = positional
        self.given = given
    }

    private func spec(_ name: String) -> OptionSpec {
        guard let spec = command.option(name) else { preconditionFailure("\(command.name) declares no option --\(name)") }
        return spec
    }

    /// Whether the option is on the command line (a default does not count).
    public func has(_ name: String) -> Bool {
        _ = spec(name)
        return given[name] != nil
    }

    /// A flag's value: whether it was given.
    public func flag(_ name: String) -> Bool {
        precondition(spec(name).arity == .flag, "--\(name) is not a flag")
        return given[name] != nil
    }

    /// The value given, else the declared default, else nil.
    public func string(_ name: String) -> String? {
        let s = spec(name)
        precondition(s.arity == .single, "--\(name) is not a single-valued option")
        return given[name]?.first ?? s.defaultValue
    }

    /// `string(name)`, or a usage error when there is none (for options required only in some cases).
    public func required(_ name: String, _ why: String? = nil) throws -> String {
        guard let v = string(name) else {
            throw command.usageError("missing required option --\(name) \(spec(name).placeholder)" + (why.map { " \($0)" } ?? ""))
        }
        return v
    }

    /// Every value of a repeatable option, in order.
    public func values(_ name: String) -> [String] {
        precondition(spec(name).arity == .repeated, "--\(name) is not repeatable")
        return given[name] ?? []
    }

    /// The value (or default) as an integer of at least `minimum`; throws if absent, malformed or too small.
    public func int(_ name: String, atLeast minimum: Int? = nil) throws -> Int {
        let raw = try required(name)
        guard let v = Int(raw), v >= (minimum ?? Int.min) else {
            throw command.usageError("--\(name) must be an integer\(minimum.map { " >= \($0)" } ?? ""), got '\(raw)'")
        }
        return v
    }

    /// The value (or default) as a finite number of at least `minimum` (or above it, when `exclusive`).
    public func double(_ name: String, atLeast minimum: Double? = nil, exclusive: Bool = false) throws -> Double {
        let raw = try required(name)
        let bound = minimum.map { exclusive ? " > \(Self.plain($0))" : " >= \(Self.plain($0))" } ?? ""
        guard let v = Double(raw), v.isFinite,
              minimum.map({ exclusive ? v > $0 : v >= $0 }) ?? true else {
            throw command.usageError("--\(name) must be a number\(bound), got '\(raw)'")
        }
        return v
    }

    /// The value (or default) as a size in bytes (`24GiB`, `80GB`, `512MiB`); nil when there is none.
    public func bytes(_ name: String) throws -> Int? {
        guard let raw = string(name) else { return nil }
        do { return try parseBytes(raw) } catch {
            throw command.usageError("--\(name) \(raw) is not a size; write e.g. 24GiB, 24GB or 800MB")
        }
    }

    /// The value (or default) split at commas ("a,b,c"), empty items kept; nil when there is none.
    public func list(_ name: String) -> [String]? {
        string(name)?.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
    }

    /// `3` for 3.0, else the number as Swift prints it.
    static func plain(_ x: Double) -> String {
        x == x.rounded() && abs(x) < 1e15 ? String(Int(x)) : String(x)
    }
}
