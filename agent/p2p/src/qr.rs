//! QR onboarding (SPEC.md section 8): the pairing token as a QR code, drawn with block
//! characters on the console and saved as a PNG; and the decoder `register` uses.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use qrcode::render::unicode::Dense1x2;
use qrcode::{Color, QrCode};

use kairos_util::{IoError, IoResultExt};

/// Pixels per module in the PNG: large enough for a phone camera or a screenshot.
const SCALE: usize = 8;
/// The quiet zone QR readers need around the code, in modules.
const QUIET: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error("the token does not fit in a QR code: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("encoding PNG {path}: {msg}")]
    PngEncode { path: PathBuf, msg: String },
    #[error("{path} is not a PNG image this decoder reads: {msg}")]
    PngDecode { path: PathBuf, msg: String },
    #[error("no QR code found in {0}")]
    NotFound(PathBuf),
    #[error("the QR code in {path} does not decode: {msg}")]
    Decode { path: PathBuf, msg: String },
    #[error("no QR code drawn in block characters (▀ ▄ █) in the text")]
    NoTextCode,
    #[error("the block-character QR code in the text does not decode: {0}")]
    TextDecode(String),
}

fn code(data: &str) -> Result<QrCode, QrError> {
    QrCode::new(data.as_bytes()).map_err(|e| QrError::Encode(e.to_string()))
}

/// The code as text, two modules per character cell (upper and lower half blocks), dark on
/// light with the quiet zone, for a console.
pub fn render_text(data: &str) -> Result<String, QrError> {
    Ok(code(data)?
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Dark)
        .light_color(Dense1x2::Light)
        .quiet_zone(true)
        .build())
}

/// Upper half, lower half dark: the characters [`render_text`] draws (Dense1x2).
fn cell(c: char) -> Option<(bool, bool)> {
    match c {
        ' ' => Some((false, false)),
        '\u{2580}' => Some((true, false)),
        '\u{2584}' => Some((false, true)),
        '\u{2588}' => Some((true, true)),
        _ => None,
    }
}

/// The text of the QR code drawn by [`render_text`] somewhere in `text`: a console log with
/// other lines around it, `\r\n` line ends, trailing spaces cut. Each run of lines made only
/// of block characters and spaces is read back into modules (two per character, upper and
/// lower), cropped to its dark modules (the finder patterns are three of its corners) and
/// decoded; the last run that decodes wins (a log holds codes oldest first: a node that
/// showed a new code after a failed pairing listens with the newest).
pub fn decode_text(text: &str) -> Result<String, QrError> {
    let mut runs: Vec<Vec<&str>> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        let drawn = line.chars().all(|c| cell(c).is_some());
        if drawn {
            run.push(line);
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    runs.push(run);
    runs.reverse();
    // Last, all drawn lines as one run: one code with a kernel message printed into it.
    let all: Vec<&str> = runs.iter().rev().flatten().copied().collect();
    if runs.len() > 1 {
        runs.push(all);
    }
    let mut last = None;
    for run in runs {
        // Blank lines around the code (its quiet zone) carry nothing.
        let Some(first) = run.iter().position(|l| !l.trim().is_empty()) else {
            continue;
        };
        let end = run
            .iter()
            .rposition(|l| !l.trim().is_empty())
            .unwrap_or(first);
        match decode_rows(&run[first..=end]) {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(QrError::NoTextCode))
}

/// Decodes lines of block characters: two module rows per line.
fn decode_rows(lines: &[&str]) -> Result<String, QrError> {
    let mut rows: Vec<Vec<bool>> = Vec::new();
    for l in lines {
        let (top, bottom): (Vec<bool>, Vec<bool>) = l.chars().filter_map(cell).unzip();
        rows.push(top);
        rows.push(bottom);
    }
    let dark = |x: usize, y: usize| rows.get(y).and_then(|r| r.get(x)).copied().unwrap_or(false);
    let mut ys = (0..rows.len()).filter(|&y| rows[y].iter().any(|d| *d));
    let (Some(y0), y1) = (ys.next(), ys.next_back()) else {
        return Err(QrError::NoTextCode);
    };
    let y1 = y1.unwrap_or(y0);
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut xs = (0..width).filter(|&x| (y0..=y1).any(|y| dark(x, y)));
    let (Some(x0), x1) = (xs.next(), xs.next_back()) else {
        return Err(QrError::NoTextCode);
    };
    let x1 = x1.unwrap_or(x0);
    let size = x1 - x0 + 1;
    if y1 - y0 + 1 != size || size < 21 || (size - 17) % 4 != 0 {
        return Err(QrError::TextDecode(format!(
            "the drawn code is {size} x {} modules, not the square of a QR version",
            y1 - y0 + 1
        )));
    }
    let grid = rqrr::SimpleGrid::from_func(size, |x, y| dark(x0 + x, y0 + y));
    rqrr::Grid::new(grid)
        .decode()
        .map(|(_, t)| t)
        .map_err(|e| QrError::TextDecode(e.to_string()))
}

/// Write the code as an 8-bit greyscale PNG.
pub fn write_png(data: &str, path: &Path) -> Result<(), QrError> {
    let qr = code(data)?;
    let w = qr.width();
    let colors = qr.to_colors();
    let side = (w + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c != Color::Dark {
            continue;
        }
        let (mx, my) = (i % w + QUIET, i / w + QUIET);
        for y in my * SCALE..(my + 1) * SCALE {
            pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir, "creating the directory")?;
    }
    // The picture is the token: readable by root only.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|f| {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                Ok(f)
            })
            .at(path, "creating")?
    };
    let perr = |e: png::EncodingError| QrError::PngEncode {
        path: path.to_owned(),
        msg: e.to_string(),
    };
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), side as u32, side as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(perr)?;
    writer.write_image_data(&pixels).map_err(perr)?;
    writer.finish().map_err(perr)
}

/// The text of the first QR code found in a PNG (a saved code, a screenshot, a photo).
pub fn decode_png(path: &Path) -> Result<String, QrError> {
    let file = std::fs::File::open(path).at(path, "opening")?;
    let derr = |msg: String| QrError::PngDecode {
        path: path.to_owned(),
        msg,
    };
    let mut dec = png::Decoder::new(BufReader::new(file));
    // Palette, 16-bit and sub-byte images all become 8-bit grey/RGB(A).
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().map_err(|e| derr(e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| derr("image too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| derr(e.to_string()))?;
    let channels = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = info.line_size;
    let grey = |x: usize, y: usize| -> u8 {
        let p = &buf[y * stride + x * channels..];
        match channels {
            1 | 2 => p[0],
            // Luma from RGB; alpha ignored (codes are opaque).
            _ => {
                ((u32::from(p[0]) * 299 + u32::from(p[1]) * 587 + u32::from(p[2]) * 114) / 1000)
                    as u8
            }
        }
    };
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, grey);
    let grids = img.detect_grids();
    let grid = grids
        .first()
        .ok_or_else(|| QrError::NotFound(path.to_owned()))?;
    let (_, text) = grid.decode().map_err(|e| QrError::Decode {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Token;

    #[test]
    fn token_round_trips_through_png() {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::generate().encode();
        let png = dir.path().join("run/kairos/pairing.png");
        write_png(&token, &png).unwrap();
        assert_eq!(decode_png(&png).unwrap(), token);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&png).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the PNG holds the token");
        let text = render_text(&token).unwrap();
        assert!(text.contains('█') || text.contains('▀') || text.contains('▄'));
    }

    #[test]
    fn token_round_trips_through_console_text() {
        let token = Token::generate().encode();
        let drawn = render_text(&token).unwrap();
        // As a serial log holds it: CR LF line ends, log lines around it, one line with its
        // trailing blanks cut and the blank quiet-zone lines gone.
        let mut lines: Vec<String> = drawn.lines().map(str::to_owned).collect();
        lines.retain(|l| !l.trim().is_empty());
        lines[3] = lines[3].trim_end().to_owned();
        let log = format!(
            "[    1.234] kairos-init: started /usr/bin/kairos-agent\r\nInstall by hand: kairos-agent install --device /dev/vda\r\n\r\n{}\r\n\r\nkairos-agent register <token|qr.png|qr.txt>\r\n",
            lines.join("\r\n")
        );
        assert_eq!(decode_text(&log).unwrap(), token);
        // As drawn, plain.
        assert_eq!(decode_text(&drawn).unwrap(), token);
        // A kernel message printed into the middle of the code.
        let mut split = lines.clone();
        split.insert(12, "[   12.345678] random: crng init done".into());
        assert_eq!(decode_text(&split.join("\n")).unwrap(), token);
        // Two codes: the newest (last) wins; garbage and no code at all are named errors.
        let other = Token::generate().encode();
        let two = format!("{drawn}\nbetween\n{}", render_text(&other).unwrap());
        assert_eq!(decode_text(&two).unwrap(), other);
        assert!(matches!(
            decode_text("no code here\n"),
            Err(QrError::NoTextCode)
        ));
        let cut: String = drawn.lines().take(10).collect::<Vec<_>>().join("\n");
        assert!(
            matches!(decode_text(&cut), Err(QrError::TextDecode(_))),
            "{cut}"
        );
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing.png");
        assert!(
            decode_png(&p)
                .unwrap_err()
                .to_string()
                .contains("missing.png")
        );
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not a png").unwrap();
        assert!(matches!(decode_png(&junk), Err(QrError::PngDecode { .. })));
        // A valid PNG with no code in it.
        let blank = dir.path().join("blank.png");
        let f = std::fs::File::create(&blank).unwrap();
        let mut enc = png::Encoder::new(f, 64, 64);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&[255u8; 64 * 64])
            .unwrap();
        assert!(matches!(decode_png(&blank), Err(QrError::NotFound(_))));
    }
}
